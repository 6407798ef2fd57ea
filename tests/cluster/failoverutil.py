"""A client in the lab's client namespace that writes and samples the public service.

The client reaches the cluster only through the public service address. Each round it
writes one key (``PUT /kv/wN``, acknowledged with 201 once durable) and asks which node
answers (``GET /whoami``), and prints one JSON line per round. The test reads the lines
after stopping it: which node answered when, which writes were acknowledged.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from clusterutil import wait_until

from stead.cli.client import AgentClient
from stead.lab import Lab

PUBLIC = "198.19.0.100"
PORT = 8080

CLIENT = r"""
import json, sys, time, urllib.request, urllib.error
base = sys.argv[1]
pause = float(sys.argv[2])
i = 0
while True:
    i += 1
    t = time.time()
    acked = False
    try:
        req = urllib.request.Request(f"{base}/kv/w{i}", data=f"value {i}".encode(), method="PUT")
        with urllib.request.urlopen(req, timeout=0.5) as r:
            acked = r.status == 201
    except Exception:
        pass
    node = None
    try:
        with urllib.request.urlopen(f"{base}/whoami", timeout=0.3) as r:
            node = json.load(r)["node"]
    except Exception:
        pass
    print(json.dumps({"t": t, "i": i, "acked": acked, "node": node}), flush=True)
    time.sleep(pause)
"""


@dataclass
class Samples:
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def acked(self) -> list[int]:
        return [row["i"] for row in self.rows if row["acked"]]

    def answered_by(self) -> list[str | None]:
        return [row["node"] for row in self.rows]

    def longest_outage(self) -> float:
        """Seconds of the longest run of rounds in which nobody answered."""
        longest, start = 0.0, None
        for row in self.rows:
            if row["node"] is None:
                start = row["t"] if start is None else start
            elif start is not None:
                longest, start = max(longest, row["t"] - start), None
        return longest


class Client:
    """The writer and sampler, running in the lab's client namespace."""

    def __init__(self, lab: Lab, pause: float = 0.02) -> None:
        self.lab = lab
        self.proc: subprocess.Popen[str] = lab.popen(
            "client",
            [sys.executable, "-c", CLIENT, f"http://{PUBLIC}:{PORT}", str(pause)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> Samples:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        samples = Samples()
        for line in out.splitlines():
            try:
                samples.rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return samples


def agent(lab: Lab, node: str, timeout: float = 15) -> AgentClient:
    return AgentClient(lab.socket_path(node), timeout=timeout)


def node_status(lab: Lab, node: str, timeout: float = 15) -> dict[str, Any]:
    return dict(agent(lab, node, timeout).call("GET", "/v1/status"))


def roles(lab: Lab) -> dict[str, tuple[str, int]]:
    """(role, epoch) of every node whose agent answers."""
    found = {}
    for node in lab.nodes:
        try:
            data = node_status(lab, node, timeout=1.5)
        except Exception:  # a stopped or frozen agent: not counted
            continue
        found[node] = (data["role"], data["epoch"])
    return found


def active_of(lab: Lab) -> str | None:
    actives = [n for n, (role, _) in roles(lab).items() if role == "active"]
    return actives[0] if len(actives) == 1 else None


def wait_active(lab: Lab, node: str, timeout: float = 30.0) -> None:
    """``node`` is active and holds the public identity, and its service answers."""

    def ready() -> bool:
        data = node_status(lab, node)
        return data["role"] == "active" and data["roles"]["public_held"]

    wait_until(ready, timeout, f"{node} to be active with the public identity")
    wait_until(lambda: whoami(lab) == node, timeout, f"{node} to answer on the public address")


def whoami(lab: Lab) -> str | None:
    result = lab.exec(
        "client",
        ["curl", "-s", "-m", "1", f"http://{PUBLIC}:{PORT}/whoami"],
        capture=True,
        timeout=10,
    )
    if result.returncode != 0:
        return None
    try:
        return str(json.loads(result.stdout)["node"])
    except (ValueError, KeyError):
        return None


def holders(lab: Lab) -> list[str]:
    """Nodes whose pub0 carries the public address right now."""
    found = []
    for node in lab.nodes:
        result = subprocess.run(
            ["ip", "-n", f"stead-{node}", "-o", "addr", "show", "dev", "pub0"],
            capture_output=True,
            text=True,
            check=False,
        )
        if f" {PUBLIC}/" in result.stdout:
            found.append(node)
    return found


def read_key(lab: Lab, key: str) -> str | None:
    result = lab.exec(
        "client",
        ["curl", "-s", "-f", "-m", "2", f"http://{PUBLIC}:{PORT}/kv/{key}"],
        capture=True,
        timeout=10,
    )
    return result.stdout if result.returncode == 0 else None


def epochs_only_grow(history: list[dict[str, tuple[str, int]]]) -> None:
    last: dict[str, int] = {}
    for snapshot in history:
        for node, (_, epoch) in snapshot.items():
            assert epoch >= last.get(node, 0), f"{node}'s epoch went back: {history}"
            last[node] = epoch


def sample_roles(lab: Lab, seconds: float, interval: float = 0.2) -> list[dict[str, Any]]:
    """Roles over a period: never two actives in the same epoch."""
    history = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        snapshot = roles(lab)
        history.append(snapshot)
        actives = [(n, e) for n, (r, e) in snapshot.items() if r == "active"]
        epochs = [e for _, e in actives]
        assert len(epochs) == len(set(epochs)), f"two actives in one epoch: {actives}"
        time.sleep(interval)  # sampling other processes' state over time: nothing to await
    return history


def switchover(lab: Lab, source: str, target: str) -> dict[str, Any]:
    """Ask ``source`` to hand the role to ``target``; wait until the target serves."""
    job = agent(lab, source).call("POST", "/v1/switchover", {"to": target})
    deadline = time.monotonic() + 120
    while job["state"] == "running" and time.monotonic() < deadline:
        job = agent(lab, source).call("GET", f"/v1/jobs/{job['id']}?wait=5")  # at its end
    assert job["state"] == "done", job
    wait_active(lab, target)
    return dict(job)
