"""The lab's demo service: a small HTTP key-value store whose data is the protected path."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yarl
from aiohttp import web

from stead.lab import demo_service
from stead.lab.demo_service import create_app, valid_key, write_durably, write_group_durably

Served = tuple[aiohttp.ClientSession, str, Path]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The app on a free port of 127.0.0.1, with a client session and its data directory."""
    runner = web.AppRunner(create_app(tmp_path), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            yield session, base, tmp_path
    finally:
        await runner.cleanup()


async def test_health_and_whoami(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    session, base, _ = served
    async with session.get(f"{base}/health") as response:
        assert response.status == 200
        assert await response.text() == "ok"
    monkeypatch.setenv("STEAD_NODE", "secondary")
    monkeypatch.setenv("STEAD_EPOCH", "7")
    async with session.get(f"{base}/whoami") as response:
        data = await response.json()
    assert data["node"] == "secondary"
    assert data["hostname"] == os.uname().nodename
    assert data["epoch"] == 7
    monkeypatch.delenv("STEAD_NODE")
    monkeypatch.delenv("STEAD_EPOCH")
    async with session.get(f"{base}/whoami") as response:
        data = await response.json()
    assert data == {"node": os.uname().nodename, "hostname": os.uname().nodename, "epoch": None}


async def test_put_then_get_stores_the_bytes_in_the_data_directory(served: Served) -> None:
    session, base, data_dir = served
    body = bytes(range(256)) * 1000
    async with session.put(f"{base}/kv/blob-1.bin", data=body) as response:
        assert response.status == 201
    assert (data_dir / "blob-1.bin").read_bytes() == body
    async with session.get(f"{base}/kv/blob-1.bin") as response:
        assert response.status == 200
        assert await response.read() == body
    async with session.put(f"{base}/kv/blob-1.bin", data=b"v2") as response:
        assert response.status == 201
    async with session.get(f"{base}/kv/blob-1.bin") as response:
        assert await response.read() == b"v2"
    assert sorted(p.name for p in data_dir.iterdir()) == ["blob-1.bin"]  # no temporary left
    async with session.get(f"{base}/kv/missing") as response:
        assert response.status == 404


@pytest.mark.parametrize("key", ["a~b", "a%20b", "x" * 129, "a%2Fb", "%2E%2E"])
async def test_bad_keys_are_refused(served: Served, key: str) -> None:
    session, base, data_dir = served
    url = yarl.URL(f"{base}/kv/{key}", encoded=True)  # sent as written, not normalised
    async with session.put(url, data=b"x") as response:
        assert response.status == 400
    async with session.get(url) as response:
        assert response.status == 400
    assert list(data_dir.iterdir()) == []


def test_key_rule() -> None:
    assert valid_key("a") and valid_key("A.b_c-9") and valid_key("x" * 128)
    assert valid_key(".hidden")
    for bad in ("", ".", "..", "x" * 129, "a/b", "a b", "é", "a~b"):
        assert not valid_key(bad), bad


def test_a_failed_write_leaves_the_old_value_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_durably(tmp_path, "k", b"old")

    def broken_sync(directory: Path, fds: list[int]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(demo_service, "_sync_data", broken_sync)
    with pytest.raises(OSError, match="Input/output"):
        write_group_durably(tmp_path, [("k", b"new"), ("k2", b"other")])
    assert (tmp_path / "k").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


async def test_concurrent_writes_share_group_commits(served: Served) -> None:
    """Writes that arrive while a group is being flushed are flushed together, and each
    answer still comes only once its own write is durable and in place."""
    session, base, data_dir = served

    async def put(i: int) -> int:
        async with session.put(f"{base}/kv/k{i}", data=b"v%d" % i) as response:
            return response.status

    statuses = await asyncio.gather(*(put(i) for i in range(100)))
    assert statuses == [201] * 100
    assert all((data_dir / f"k{i}").read_bytes() == b"v%d" % i for i in range(100))
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(f"k{i}" for i in range(100))


def test_the_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data" / "demo"  # made by the first write, like /srv/lab/demo
    argv = [sys.executable, "-m", "stead.lab.demo_service", "--port", "0", "--data", str(data)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"listening on 0\.0\.0\.0:(\d+)", line)
            assert match, line
            base = f"http://127.0.0.1:{match[1]}"
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                assert response.read() == b"ok"
            assert not (tmp_path / "data").exists()  # starting changes nothing on disk
            put = urllib.request.Request(f"{base}/kv/greeting", data=b"hello", method="PUT")
            with urllib.request.urlopen(put, timeout=5) as response:
                assert response.status == 201
            with urllib.request.urlopen(f"{base}/kv/greeting", timeout=5) as response:
                assert response.read() == b"hello"
            with urllib.request.urlopen(f"{base}/whoami", timeout=5) as response:
                assert json.loads(response.read())["hostname"] == os.uname().nodename
            assert (data / "greeting").read_bytes() == b"hello"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "stopping" in err


async def test_group_writer_flushes_waiting_writes_together(tmp_path: Path) -> None:
    writer = demo_service.GroupWriter(tmp_path / "data")
    try:
        await asyncio.gather(*(writer.write(f"k{i}", b"v%d" % i) for i in range(100)))
    finally:
        await writer.close()
    assert writer.groups <= 2  # not one flush per write
    assert (tmp_path / "data" / "k99").read_bytes() == b"v99"
