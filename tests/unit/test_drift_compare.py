"""Drift: the pure comparison, snapshots fetched in pages, the active's run, API and CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stead.api.server import serve_unix
from stead.channel import messages as m
from stead.channel.framing import decode_frame, encode_frame
from stead.errors import ChannelError, ProtocolError, UsageError
from stead.system.compare import compare, compare_manifests, compare_packages
from stead.system.drift import run_drift
from stead.system.manifest import PathEntry, Scope, SystemManifest
from stead.system.snapshot import (
    KEEP_COUNT,
    KEEP_SECONDS,
    Snapshot,
    SnapshotPages,
    encode_snapshot,
    fetch_snapshot,
    take_snapshot,
)

DIGEST_A, DIGEST_B = b"a" * 32, b"b" * 32


def entry(path: str, kind: str = "file", **fields: Any) -> PathEntry:
    values: dict[str, Any] = {"mode": 0o644, "uid": 0, "gid": 0}
    if kind == "file":
        values.update(size=1, digest=DIGEST_A)
    values.update(fields)
    return PathEntry(path, kind, **values)


def manifest(*entries: PathEntry) -> SystemManifest:
    return SystemManifest(entries={e.path: e for e in entries})


# ---- the comparison ------------------------------------------------------------------------


def test_packages_only_on_either_side_and_other_versions() -> None:
    drift = compare_packages(
        {"a": "1", "b": "2", "c": "3", "libc6:amd64": "2.36"},
        {"b": "2", "c": "4", "d": "1", "libc6:i386": "2.36"},
    )
    assert drift.only_active == {"a": "1", "libc6:amd64": "2.36"}
    assert drift.only_passive == {"d": "1", "libc6:i386": "2.36"}
    assert drift.version_differs == {"c": ("3", "4")}
    assert drift.count() == 5
    assert drift.to_json()["version_differs"] == {"c": ["3", "4"]}


def test_every_kind_of_path_difference() -> None:
    active = manifest(
        entry("/etc", "dir", mode=0o755),
        entry("/etc/same"),
        entry("/etc/gone"),
        entry("/etc/content"),
        entry("/etc/mode"),
        entry("/etc/owner"),
        entry("/etc/both"),
        entry("/etc/link", "symlink", target="a"),
        entry("/etc/dev", "char", rdev=1),
        entry("/etc/kind"),
    )
    passive = manifest(
        entry("/etc", "dir", mode=0o755),
        entry("/etc/same"),
        entry("/etc/new"),
        entry("/etc/content", digest=DIGEST_B),
        entry("/etc/mode", mode=0o600),
        entry("/etc/owner", uid=1000, gid=1000),
        entry("/etc/both", mode=0o640, size=2, digest=DIGEST_B),
        entry("/etc/link", "symlink", target="b"),
        entry("/etc/dev", "char", rdev=2),
        entry("/etc/kind", "dir", mode=0o755),
    )
    drift = compare_manifests(active, passive)
    assert drift.only_active == ["/etc/gone"]
    assert drift.only_passive == ["/etc/new"]
    assert drift.content == ["/etc/both", "/etc/content", "/etc/dev", "/etc/link"]
    assert drift.metadata == [
        {"path": "/etc/both", "differs": {"mode": ["0644", "0640"]}},
        {"path": "/etc/mode", "differs": {"mode": ["0644", "0600"]}},
        {"path": "/etc/owner", "differs": {"uid": [0, 1000], "gid": [0, 1000]}},
    ]
    assert drift.type == [{"path": "/etc/kind", "active": "file", "passive": "dir"}]
    assert drift.unreadable == []
    assert drift.count() == 10
    assert drift.compared == 9
    assert compare_manifests(active, passive) == drift  # deterministic


def test_unreadable_paths_are_listed_not_counted() -> None:
    active = manifest(
        entry("/etc", "dir"),
        entry("/etc/locked", "dir", error="cannot list: Permission denied"),
        entry("/etc/locked/a"),
        entry("/etc/secret", error="Permission denied", digest=b""),
        entry("/etc/lockedness"),  # a sibling whose name starts alike is compared
    )
    passive = manifest(
        entry("/etc", "dir"),
        entry("/etc/locked", "dir"),
        entry("/etc/locked/b"),
        entry("/etc/secret", digest=DIGEST_B),
    )
    drift = compare_manifests(active, passive)
    assert drift.unreadable == [
        {"path": "/etc/locked", "active": "cannot list: Permission denied", "passive": ""},
        {"path": "/etc/secret", "active": "Permission denied", "passive": ""},
    ]
    assert drift.only_active == ["/etc/lockedness"]
    assert drift.only_passive == drift.content == []
    assert drift.count() == 1


def test_identical_nodes_are_in_step_and_missing_parts_are_skipped() -> None:
    same = manifest(entry("/etc", "dir"), entry("/etc/x"))
    drift = compare({"a": "1"}, {"a": "1"}, same, same)
    assert drift.in_step and drift.count() == 0
    assert drift.to_json() == {
        "in_step": True,
        "differences": 0,
        "packages": {"only_active": {}, "only_passive": {}, "version_differs": {}},
        "paths": {
            "only_active": [],
            "only_passive": [],
            "content": [],
            "metadata": [],
            "type": [],
            "unreadable": [],
            "compared": 2,
        },
    }
    packages_only = compare({"a": "1"}, {"b": "1"}, None, None)
    assert packages_only.paths is None and packages_only.count() == 2


# ---- snapshots in pages ----------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "opt"
    root.mkdir()
    for i in range(200):
        (root / f"file-{i:03}").write_bytes(os.urandom(64))  # digests do not compress
    return root


def over_a_heartbeat_link(pages: SnapshotPages, log: list[dict[str, Any]]) -> Any:
    """``ask`` through real frames of a heartbeat link's size (1 MiB) and message checks."""

    async def ask(body: dict[str, Any], timeout: float) -> dict[str, Any]:
        request = m.parse_message(decode_frame(encode_frame(m.Request(1, "x", body).to_wire())))
        assert isinstance(request, m.Request)
        log.append(request.body)
        try:
            reply = m.Reply(id=1, ok=True, body=await pages.answer(request.body), error="")
        except UsageError as exc:
            reply = m.Reply(id=1, ok=False, body={}, error=str(exc))
        back = m.parse_message(decode_frame(encode_frame(reply.to_wire()), 1024**2))
        assert isinstance(back, m.Reply)
        if not back.ok:
            raise ChannelError(back.error)
        return back.body

    return ask


async def test_a_snapshot_travels_in_pages(tree: Path) -> None:
    pages = SnapshotPages("secondary", Scope(trees=(str(tree),)), "none", page_bytes=2000)
    log: list[dict[str, Any]] = []
    fetched = await fetch_snapshot(over_a_heartbeat_link(pages, log), packages=False)
    local = take_snapshot("secondary", Scope(trees=(str(tree),)), "none", packages=False)
    assert fetched.node == "secondary" and fetched.packages is None
    assert fetched.manifest is not None and local.manifest is not None
    assert fetched.manifest.entries == local.manifest.entries
    assert len(log) > 3  # several pages
    assert log[0] == {"trees": True, "packages": False}
    assert [b["page"] for b in log[1:]] == list(range(1, len(log)))
    assert pages._kept == {}  # the last page served: nothing kept


async def test_pages_are_checked_and_kept_bounded(tree: Path) -> None:
    now = [0.0]
    pages = SnapshotPages(
        "n", Scope(trees=(str(tree),)), "none", page_bytes=2000, clock=lambda: now[0]
    )
    first = await pages.answer({})
    assert first["pages"] > 1 and first["page"] == 0
    with pytest.raises(UsageError, match="page must be"):
        await pages.answer({"token": first["token"], "page": first["pages"]})
    with pytest.raises(UsageError, match="no such system snapshot"):
        await pages.answer({"token": "nope", "page": 1})
    with pytest.raises(UsageError, match="true or false"):
        await pages.answer({"trees": "yes"})
    now[0] += KEEP_SECONDS + 1
    for _ in range(KEEP_COUNT):
        await pages.answer({})
    assert first["token"] not in pages._kept  # expired, then the oldest dropped first
    assert len(pages._kept) == KEEP_COUNT

    async def tampered(body: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = await pages.answer(body)
        if body.get("page") == 1:
            reply["data"] = bytes(len(reply["data"]))
        return reply

    with pytest.raises(ProtocolError, match="digest"):
        await fetch_snapshot(tampered)

    async def oversized(body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await pages.answer(body)

    with pytest.raises(ProtocolError, match="exceeds"):
        await fetch_snapshot(oversized, max_size=100)
    with pytest.raises(UsageError, match="exclude paths in"):
        encode_snapshot(take_snapshot("n", Scope(trees=(str(tree),)), "none"), max_size=1000)


# ---- the active's run ------------------------------------------------------------------------


def snapshot(node: str, entries: list[PathEntry], packages: dict[str, str]) -> Snapshot:
    return Snapshot(
        node=node,
        scope=Scope(trees=("/etc",)).describe(),
        manager="dpkg",
        packages=packages,
        manifest=manifest(*entries),
    )


class Prepared(SnapshotPages):
    """A peer that serves a prepared snapshot instead of walking its own trees."""

    def __init__(self, prepared: Snapshot) -> None:
        super().__init__(prepared.node, Scope(trees=()), "none")
        self.prepared = prepared

    def take(self, trees: bool, packages: bool) -> Snapshot:
        return self.prepared


async def test_run_drift_reports_each_passive() -> None:
    base = [entry("/etc", "dir"), entry("/etc/a")]
    other_scope = snapshot("same", base, {"pkg": "1"})
    other_scope.scope = Scope(trees=("/etc", "/opt")).describe()
    other_scope.manager = "rpm"
    assert other_scope.manifest is not None
    other_scope.manifest.missing = ["/opt"]
    peers = {
        "drifted": Prepared(snapshot("drifted", [*base, entry("/etc/b")], {"pkg": "2"})),
        "same": Prepared(other_scope),
    }

    async def local(trees: bool, packages: bool) -> Snapshot:
        return snapshot("primary", base, {"pkg": "1"})

    def ask(name: str) -> Any:
        async def send(body: dict[str, Any], timeout: float) -> dict[str, Any]:
            if name == "broken":
                raise ChannelError("broken refused system-manifest: dpkg-query failed")
            return await peers[name].answer(body)

        return send

    result = await run_drift(
        active="primary",
        passives=["drifted", "same", "broken", "down"],
        local=local,
        ask=ask,
        connected=lambda name: name != "down",
    )
    nodes = result["nodes"]
    assert list(nodes) == ["drifted", "same", "broken", "down"]
    assert nodes["drifted"]["state"] == "drifted"
    assert nodes["drifted"]["paths"]["only_passive"] == ["/etc/b"]
    assert nodes["drifted"]["packages"]["version_differs"] == {"pkg": ["1", "2"]}
    assert nodes["drifted"]["differences"] == 2 and nodes["drifted"]["warnings"] == []
    # In step, but it walked other trees with another package manager: warned about.
    assert nodes["same"]["state"] == "in step"
    assert [w.split(" ")[0] for w in nodes["same"]["warnings"]] == ["its", "it", "/opt"]
    assert nodes["broken"] == {
        "state": "failed",
        "error": "Channel error: broken refused system-manifest: dpkg-query failed",
    }
    assert nodes["down"] == {"state": "unreachable", "error": "no heartbeat link to it is up"}
    assert result["active"] == "primary" and result["manager"] == "dpkg"


async def test_a_failure_on_the_active_fails_the_run() -> None:
    async def local(trees: bool, packages: bool) -> Snapshot:
        raise UsageError("system.packages is 'rpm' but rpm is not installed on this node")

    def ask(name: str) -> Any:
        async def send(body: dict[str, Any], timeout: float) -> dict[str, Any]:
            await asyncio.sleep(3600)  # cancelled when the active's own part fails
            raise AssertionError

        return send

    with pytest.raises(UsageError, match="rpm is not installed"):
        await run_drift(
            active="primary", passives=["secondary"], local=local, ask=ask, connected=bool
        )


# ---- API and CLI -----------------------------------------------------------------------------


class StubAgent:
    """Stands in for the active behind the API; answers drift from a prepared result."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.calls: list[dict[str, Any]] = []

    async def drift(self, *, node: str | None, trees: bool, packages: bool) -> dict[str, Any]:
        self.calls.append({"node": node, "trees": trees, "packages": packages})
        if node == "ghost":
            raise UsageError("'ghost' is not a passive of this cluster")
        return self.result


def drifted_result() -> dict[str, Any]:
    many = [f"/etc/caf\udce9-{i:02}" for i in range(45)]
    passive = compare(
        {"a": "1", "c": "1"},
        {"b": "2", "c": "2"},
        manifest(entry("/etc/x"), entry("/etc/m")),
        manifest(*(entry(p) for p in many), entry("/etc/m", mode=0o600)),
    ).to_json()
    return {
        "active": "primary",
        "trees": True,
        "packages": True,
        "manager": "dpkg",
        "scope": {},
        "missing": [],
        "seconds": 0.1,
        "nodes": {
            "secondary": {"state": "in step", "error": "", "warnings": []},
            "tertiary": {"state": "drifted", "error": "", "warnings": ["w [x]"], **passive},
        },
    }


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[StubAgent, Path]]:
    agent = StubAgent(drifted_result())
    path = tmp_path / "agent.sock"
    runner = await serve_unix(agent, path)  # type: ignore[arg-type]
    try:
        yield agent, path
    finally:
        await runner.cleanup()


async def stead_drift(path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stead",
        "drift",
        "--socket",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_prints_a_summary_and_exits_1_on_drift(api: tuple[StubAgent, Path]) -> None:
    agent, path = api
    code, out, err = await stead_drift(path)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0].startswith("drift of each passive from the active primary")
    assert "secondary: in step" in lines
    assert (
        "tertiary: drifted: 1 package only on the active, 1 package only here, "
        "1 package in another version, 1 path only on the active, 45 paths only here, "
        "1 path with another mode or owner"
    ) in lines
    assert "  warning: w [x]" in lines
    assert "    c 1 / 2" in lines
    assert "    /etc/caf\\xe9-00" in lines  # not UTF-8: shown escaped
    assert "    /etc/m  mode 0644 / 0600" in lines
    assert "    ... and 5 more (--json lists all)" in lines
    assert agent.calls == [{"node": None, "trees": True, "packages": True}]

    code, out, err = await stead_drift(path, "--json", "--node", "tertiary", "--trees-only")
    assert code == 1, err
    data = json.loads(out)
    assert len(data["nodes"]["tertiary"]["paths"]["only_passive"]) == 45
    assert data["nodes"]["tertiary"]["paths"]["only_passive"][0] == "/etc/caf\udce9-00"
    assert agent.calls[-1] == {"node": "tertiary", "trees": True, "packages": False}


async def test_cli_exit_codes_and_usage_errors(api: tuple[StubAgent, Path]) -> None:
    agent, path = api
    agent.result["nodes"] = {"secondary": {"state": "in step", "error": "", "warnings": []}}
    assert (await stead_drift(path, "--packages-only"))[0] == 0
    assert agent.calls[-1] == {"node": None, "trees": False, "packages": True}
    agent.result["nodes"]["tertiary"] = {"state": "unreachable", "error": "no link"}
    code, out, _ = await stead_drift(path)
    assert code == 3 and "tertiary: unreachable: no link" in out
    code, _, err = await stead_drift(path, "--node", "ghost")
    assert code == 11 and "'ghost' is not a passive" in err
    code, _, err = await stead_drift(path, "--packages-only", "--trees-only")
    assert code == 11 and "exclude each other" in err
    calls = len(agent.calls)
    code, _, err = await stead_drift(path.parent / "absent.sock")
    assert code == 50 and "is `stead agent` running?" in err
    assert len(agent.calls) == calls
