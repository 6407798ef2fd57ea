"""Shared pieces of the benchmarks: a lab per benchmark, node operations, baselines, results.

Every benchmark builds its own lab in a fresh directory under ``/var/tmp/stead-bench`` and
takes it down in a ``finally`` (only one lab may exist on a machine at a time). Waiting on
another process is done on an event where there is one (a "ready" line on a pipe, a command
returning); where only polling is possible (a socket accepting, an agent's status), the loop
is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from stead.cli.client import AgentClient
from stead.lab.nodes import Lab, down_all

MIB = 1 << 20
GIB = 1 << 30
BENCH_ROOT = Path("/var/tmp/stead-bench")
NODEOPS = str(Path(__file__).resolve().with_name("nodeops.py"))
PRIMARY, SECONDARY = "primary", "secondary"
RSYNC_PORT = 8730
RSYNC_MODULE_PATH = "/srv/lab/rsync-copy"


@dataclass
class Result:
    """One benchmark's outcome: the ratio (same-run baseline), its goal, and the figures."""

    name: str
    goal: str
    ratio_label: str
    ratio: float | None = None
    met: bool | None = None
    figures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- the lab ---------------------------------------------------------------------------


def take_down_leftovers() -> list[str]:
    """Remove any lab left on this machine (a crashed run, another session's lab)."""
    return down_all()


@contextlib.contextmanager
def lab(name: str, nodes: int = 2, disk_size: str = "6G") -> Iterator[Lab]:
    """A fresh lab with ``nodes`` nodes, connected and in sync; always taken down."""
    take_down_leftovers()
    directory = BENCH_ROOT / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    the_lab = Lab(directory)
    try:
        the_lab.up(nodes, disk_size=disk_size)
        wait_connected(the_lab)
        wait_sync_cli(the_lab)
        yield the_lab
    finally:
        try:
            the_lab.down()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def poll(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll another process's state (no event to await across processes), bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 10):
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def agent_status(the_lab: Lab, node: str = PRIMARY) -> dict[str, Any]:
    return dict(AgentClient(the_lab.socket_path(node), timeout=10).call("GET", "/v1/status"))


def wait_connected(the_lab: Lab, timeout: float = 30.0) -> None:
    def connected() -> bool:
        passives = [n for n in agent_status(the_lab)["nodes"] if n["role"] == "passive"]
        return bool(passives) and all(n["state"] != "disconnected" for n in passives)

    poll(connected, timeout, "passives to connect")


def wait_sync_cli(the_lab: Lab, timeout: float = 600) -> float:
    """``stead wait-sync`` inside the primary, timed from the host (includes CLI start-up)."""
    start = time.monotonic()
    the_lab.exec(
        PRIMARY,
        ["stead", "wait-sync", "--timeout", str(int(timeout))],
        check=True,
        capture=True,
        timeout=timeout + 30,
    )
    return time.monotonic() - start


def nodeop(the_lab: Lab, node: str, *args: object, timeout: float = 900) -> dict[str, Any]:
    """Run ``bench/nodeops.py`` inside ``node``; its JSON figures."""
    argv = [sys.executable, NODEOPS, *[str(a) for a in args]]
    result = the_lab.exec(node, argv, capture=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} in {node} failed ({result.returncode}): {result.stderr}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def nodeop_start(the_lab: Lab, node: str, *args: object) -> subprocess.Popen[str]:
    """Start a node operation that announces itself with a ``ready`` line; await that line."""
    argv = [sys.executable, NODEOPS, *[str(a) for a in args]]
    proc = the_lab.popen(node, argv, stdout=subprocess.PIPE, text=True)
    line = read_line(proc.stdout, 30.0)
    if not line or not json.loads(line).get("ready"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{args[0]} in {node} did not start: {line!r}")
    return proc


def read_line(stream: IO[str] | None, timeout: float) -> str:
    """One line from a pipe, waiting at most ``timeout`` (the line is the event)."""
    import selectors

    assert stream is not None
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return stream.readline()


def nodeop_finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"node operation failed ({proc.returncode})")
    return dict(json.loads(out.strip().splitlines()[-1]))


# ---- baselines -------------------------------------------------------------------------


def link_throughput(the_lab: Lab, nbytes: int) -> float:
    """Raw TCP between primary and secondary, plain sockets: bytes per second."""
    address = the_lab.addresses()[SECONDARY]
    receiver = nodeop_start(the_lab, SECONDARY, "tcp-recv", address, 7499)
    try:
        nodeop(the_lab, PRIMARY, "tcp-send", address, 7499, nbytes)
        got = nodeop_finish(receiver, 120)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if got["bytes"] != nbytes:
        raise RuntimeError(f"tcp: received {got['bytes']} of {nbytes} bytes")
    return nbytes / got["seconds"]


def disk_rate(the_lab: Lab, node: str, nbytes: int) -> float:
    """``dd conv=fsync`` of ``nbytes`` into the node's /srv/lab: bytes per second."""
    target = "/srv/lab/dd-baseline"
    count = max(1, nbytes // MIB)
    subprocess.run(["sync"], check=True)  # earlier dirty data must not be charged to dd
    dd = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "conv=fsync"]
    try:
        result = nodeop(the_lab, node, "timed", *dd, "status=none")
        if result["rc"] != 0:
            raise RuntimeError(f"dd failed ({result['rc']})")
    finally:
        the_lab.exec(node, ["rm", "-f", target], check=True)
    return count * MIB / result["seconds"]


@contextlib.contextmanager
def rsync_daemon(
    the_lab: Lab,
    node: str = SECONDARY,
    module: str = "copy",
    path: str = RSYNC_MODULE_PATH,
    *,
    read_only: bool = False,
    port: int = RSYNC_PORT,
) -> Iterator[str]:
    """An rsync daemon inside ``node`` serving ``path`` as ``module``; yields its URL.

    The default is the copy target of the replication benchmarks: a writable module under
    /srv/lab/rsync-copy on the secondary (passives do not capture: it is not replicated).
    """
    if shutil.which("rsync") is None:
        raise RuntimeError("rsync is not installed (apt-get install -y rsync, or make sysdeps)")
    conf = the_lab.dir / f"rsyncd-{module}.conf"
    conf.write_text(
        "uid = root\ngid = root\nuse chroot = no\nmax connections = 4\n"
        f"log file = {the_lab.dir / f'rsyncd-{module}.log'}\n"
        f"[{module}]\npath = {path}\nread only = {'yes' if read_only else 'no'}\n"
    )
    if not read_only:
        the_lab.exec(node, ["mkdir", "-p", path], check=True)
    address = the_lab.addresses()[node]
    argv = ["rsync", "--daemon", "--no-detach", f"--port={port}", f"--config={conf}"]
    daemon = the_lab.popen(node, argv, stdout=subprocess.DEVNULL)

    def accepts() -> bool:
        if daemon.poll() is not None:
            raise RuntimeError(f"rsync daemon exited ({daemon.returncode})")
        with socket.create_connection((address, port), timeout=1):
            return True

    try:
        poll(accepts, 15, "the rsync daemon to listen", interval=0.05)
        yield f"rsync://{address}:{port}/{module}/"
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def rsync_push(the_lab: Lab, source: str, url: str, *extra: str) -> float:
    """``rsync -a SOURCE/ URL`` inside the primary, timed there: seconds."""
    result = nodeop(the_lab, PRIMARY, "timed", "rsync", "-a", *extra, f"{source}/", url)
    if result["rc"] != 0:
        raise RuntimeError(f"rsync failed ({result['rc']})")
    return float(result["seconds"])


def flush_node_fs(the_lab: Lab, node: str) -> float:
    """``sync -f /srv/lab`` in the node (its dirty pages written out): seconds."""
    return float(nodeop(the_lab, node, "timed", "sync", "-f", "/srv/lab")["seconds"])


def clear_rsync_copy(the_lab: Lab) -> None:
    the_lab.exec(SECONDARY, ["rm", "-rf", RSYNC_MODULE_PATH], check=True)
    the_lab.exec(SECONDARY, ["mkdir", "-p", RSYNC_MODULE_PATH], check=True)


# ---- processes -------------------------------------------------------------------------


def agent_pid(the_lab: Lab, node: str) -> int:
    pid = the_lab.status()["nodes"][node]["agent_pid"]
    if not pid:
        raise RuntimeError(f"no agent runs on {node}")
    return int(pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def bare_import_rss() -> int:
    """RSS of a Python process that only imported the agent's module (the baseline)."""
    code = (
        "import stead.agent.daemon, pathlib\n"
        "for line in pathlib.Path('/proc/self/status').read_text().splitlines():\n"
        "    if line.startswith('VmRSS:'): print(int(line.split()[1]) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


# ---- formatting ------------------------------------------------------------------------


def mib_s(rate: float) -> str:
    return f"{rate / MIB:,.0f} MiB/s"


def secs(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)
