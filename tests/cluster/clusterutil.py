"""Helpers for tests that run real agents in a lab: wait for events, compare nodes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from stead.cli.client import AgentClient
from stead.lab import Lab
from treeutil import snapshot

IGNORE = (".stead", "lost+found", ".stead-lab-fill")


def status(lab: Lab, node: str | None = None) -> dict[str, Any]:
    socket = lab.socket_path(node) if node else lab.active_socket()
    return dict(AgentClient(socket, timeout=10).call("GET", "/v1/status"))


def peers(lab: Lab) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in status(lab)["nodes"] if n["role"] == "passive"}


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll another process's state (no event to await across processes), bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 10):
        try:
            if predicate():
                return
        except Exception:  # the agent may be restarting: keep polling until the deadline
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_connected(lab: Lab, timeout: float = 30.0, nodes: list[str] | None = None) -> None:
    def connected() -> bool:
        found = peers(lab)
        names = nodes or list(found)
        return all(found[n]["state"] != "disconnected" for n in names)

    wait_until(connected, timeout, "passives to connect")


def wait_sync(lab: Lab, timeout: float = 120.0) -> dict[str, Any]:
    result = lab.exec(
        lab.nodes[0],
        ["stead", "wait-sync", "--timeout", str(timeout)],
        capture=True,
        timeout=timeout + 30,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return peers(lab)


def tree(lab: Lab, node: str) -> dict[str, Any]:
    return snapshot(lab.node_fs_path(node), ignore=IGNORE)


def assert_converged(lab: Lab, nodes: list[str] | None = None) -> dict[str, Any]:
    names = nodes or lab.nodes
    reference = tree(lab, names[0])
    for name in names[1:]:
        other = tree(lab, name)
        missing = sorted(set(reference) - set(other))[:10]
        extra = sorted(set(other) - set(reference))[:10]
        differ = sorted(k for k in set(reference) & set(other) if reference[k] != other[k])[:10]
        assert other == reference, f"{name}: missing {missing}, extra {extra}, differ {differ}"
    return reference


def sh(lab: Lab, node: str, script: str, timeout: float = 300) -> str:
    result = lab.exec(node, ["sh", "-c", script], capture=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def py(lab: Lab, node: str, code: str, timeout: float = 300) -> str:
    result = lab.exec(node, ["python3", "-c", code], capture=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stead(
    lab: Lab, node: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return lab.exec(node, ["stead", *args], capture=True, timeout=timeout)


def check_json(lab: Lab, *args: str) -> dict[str, Any]:
    result = stead(lab, lab.nodes[0], "check", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return dict(json.loads(result.stdout))


def agent_log(lab: Lab, node: str) -> str:
    return Path(lab.paths(node).agent_log).read_text(errors="replace")[-4000:]


def set_cluster_option(lab: Lab, old: str, new: str) -> None:
    """Edit cluster.toml on every node and restart every agent (the file must stay equal)."""
    for node in lab.nodes:
        path = Path(lab.paths(node).etc) / "cluster.toml"
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))
    for node in lab.nodes:
        lab.stop(node)
    for node in lab.nodes:
        lab.start(node)


def assert_event(lab: Lab, node: str, kind: str) -> None:
    """The node's agent recorded an event of ``kind`` among its latest hundred."""
    events = AgentClient(lab.socket_path(node), timeout=10).call("GET", "/v1/events?limit=100")
    assert any(e["kind"] == kind for e in events), events


def build_marker_deb(where: Path, package: str, file: str, text: str) -> Path:
    """A tiny package whose one file, ``/opt/lab/marker/FILE``, lies in a tree of each lab
    node's own (with the node's own dpkg database, it is installed on that node only)."""
    root = where / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Stead tests <tests@lab.test>\nDescription: a lab test marker\n"
    )
    (root / "opt" / "lab" / "marker").mkdir(parents=True)
    (root / "opt" / "lab" / "marker" / file).write_text(text)
    deb = where / f"{package}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deb.chmod(0o644)
    return deb
