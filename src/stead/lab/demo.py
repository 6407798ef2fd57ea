"""``make demo``: a three-node lab: replication, switchover, failover and reclone.

Builds (or reuses) the lab at the default directory, writes and changes files under the
protected path on the active node, waits until both passives have applied everything, and
shows the files on every node with the measured lag. Then a client on the public network
writes to the demo service while the role is switched over to the secondary (planned, no
data loss) and while the active node is killed (failover); it shows who answers and that
every acknowledged write is still there. Last, the active is "patched" (its system trees
change) and the node that came back is recloned from it, keeping its own configuration.
The lab is left running to explore.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from rich.console import Console

from stead.cli.client import AgentClient
from stead.cli.status import render_roles, render_status
from stead.lab.nodes import Lab, default_dir

console = Console()
CONNECT_TIMEOUT = 60.0


def _step(text: str) -> None:
    console.rule(f"[bold]{text}")


def _sh(lab: Lab, node: str, script: str) -> str:
    result = lab.exec(node, ["sh", "-c", script], check=True, capture=True)
    return result.stdout


def _status(lab: Lab) -> dict[str, Any]:
    return dict(AgentClient(lab.active_socket()).call("GET", "/v1/status"))


def _wait_connected(lab: Lab) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while time.monotonic() < deadline:
        nodes = _status(lab)["nodes"]
        if all(n["state"] in ("in sync", "syncing", "active") for n in nodes):
            return
        time.sleep(0.2)  # polling another process's view: bounded by the deadline
    raise SystemExit("passives did not connect within 60 s; see `stead lab status`")


PUBLIC_URL = "http://198.19.0.100:8080"


def _client(lab: Lab, argv: list[str]) -> str:
    result = lab.exec("client", argv, capture=True, timeout=30)
    return result.stdout.strip()


def _whoami(lab: Lab) -> str:
    try:
        return str(
            json.loads(_client(lab, ["curl", "-s", "-m", "1", f"{PUBLIC_URL}/whoami"]))["node"]
        )
    except (ValueError, KeyError):
        return "nobody"


def _put(lab: Lab, key: str, value: str) -> bool:
    code = _client(
        lab,
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "2",
            "-X",
            "PUT",
            "--data",
            value,
            f"{PUBLIC_URL}/kv/{key}",
        ],
    )
    return code == "201"


def _count_kept(lab: Lab, keys: list[str]) -> int:
    url = f"{PUBLIC_URL}/kv/"
    return sum(1 for key in keys if _client(lab, ["curl", "-s", "-f", "-m", "2", url + key]))


def _wait_answer(lab: Lab, node: str, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _whoami(lab) == node:
            return time.monotonic() - started
        time.sleep(0.05)  # polling the service as a client would: bounded
    raise SystemExit(f"{node} did not answer on the public address within {timeout} s")


def _switchover_and_failover(lab: Lab) -> None:
    _wait_answer(lab, "primary")
    console.print(f"  the public address {PUBLIC_URL} answers from: {_whoami(lab)}")
    acked = [f"k{i}" for i in range(20) if _put(lab, f"k{i}", f"value {i}")]
    console.print(f"  the client wrote {len(acked)} keys through the public address")
    subprocess.run(
        [sys.executable, "-m", "stead", "switchover", "--to", "secondary"],
        env=lab.node_env("primary"),
        check=True,
    )
    _wait_answer(lab, "secondary")
    kept = sum(
        1 for key in acked if _client(lab, ["curl", "-s", "-m", "2", f"{PUBLIC_URL}/kv/{key}"])
    )
    console.print(
        f"  now answering: {_whoami(lab)}; acknowledged keys found there: {kept}/{len(acked)}"
    )

    _step("6. failover: kill -9 of the active node (its agent, its services, its links)")
    more = [f"f{i}" for i in range(10) if _put(lab, f"f{i}", f"value {i}")]
    killed = time.monotonic()
    lab.kill("secondary")
    lab.partition("secondary")
    survivors = [n for n in lab.nodes if n != "secondary"]
    while time.monotonic() - killed < 30 and _whoami(lab) not in survivors:
        time.sleep(0.05)  # polling the service as a client would: bounded
    took = time.monotonic() - killed
    console.print(f"  {_whoami(lab)} answers on the public address {took:.2f} s after the kill")
    kept = sum(
        1 for key in more if _client(lab, ["curl", "-s", "-m", "2", f"{PUBLIC_URL}/kv/{key}"])
    )
    console.print(f"  keys written before the kill found there: {kept}/{len(more)}")

    _step("7. the old active returns: it sees the newer epoch and rejoins as passive")
    lab.heal("secondary")
    lab.start("secondary")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            role = AgentClient(lab.socket_path("secondary")).call("GET", "/v1/status")["role"]
        except Exception:  # the agent is starting
            role = ""
        if role == "passive":
            break
        time.sleep(0.2)  # polling another process: bounded by the deadline
    console.print(render_status(_status(lab)))
    for line in render_roles(_status(lab)):
        console.print(f"  {line}", highlight=False)


def _reclone(lab: Lab) -> None:
    active = next(n["name"] for n in _status(lab)["nodes"] if n["role"] == "active")
    _sh(
        lab,
        active,
        "set -e; echo 2.0 > /opt/lab/app/VERSION; echo 'feature = on' > /etc/lab/feature.conf",
    )
    console.print(f"  {active} (active) now has app 2.0 and /etc/lab/feature.conf")
    subprocess.run(
        [sys.executable, "-m", "stead", "reclone", "secondary"],
        env=lab.node_env(active),
        check=True,
    )
    show = "cat /opt/lab/app/VERSION /etc/lab/node.conf; ls /etc/lab | tr '\\n' ' '"
    for node in lab.nodes:
        version, own, listing = _sh(lab, node, show).splitlines()
        console.print(
            f"  {node:<10} app {version}, {own!r} (its own), /etc/lab: {listing}",
            highlight=False,
        )


def main() -> None:
    lab = Lab(default_dir())
    _step("1. a three-node lab: primary (active), secondary and tertiary (passive)")
    lab.up(3)
    status = lab.status()
    for name, node in status["nodes"].items():
        console.print(f"  {name:<10} {node['address']:<14} agent pid {node.get('agent_pid')}")
    _wait_connected(lab)

    _step("2. write on the active: a tree of files, then changes")
    started = time.monotonic()
    _sh(
        lab,
        "primary",
        "set -e; cd /srv/lab; mkdir -p app/conf app/data; "
        "echo 'listen 8080' > app/conf/server.conf; "
        "for i in $(seq 1 200); do echo record-$i > app/data/r$i.txt; done; "
        "head -c 8388608 /dev/urandom > app/data/blob.bin; "
        "ln -sf conf/server.conf app/current.conf",
    )
    _sh(
        lab,
        "primary",
        "set -e; cd /srv/lab; echo 'listen 9090' > app/conf/server.conf; "
        "mv app/data/r1.txt app/data/renamed.txt; rm app/data/r2.txt; chmod 600 app/conf/*; "
        "printf X | dd of=app/data/blob.bin bs=1 seek=4000000 conv=notrunc status=none",
    )
    result = subprocess.run(
        [sys.executable, "-m", "stead", "wait-sync", "--timeout", "60"],
        env=lab.node_env("primary"),
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit("wait-sync failed")
    elapsed = time.monotonic() - started
    console.print(f"  written, changed and applied on both passives in {elapsed:.2f} s")

    _step("3. the same tree on every node")
    digest = (
        "cd /srv/lab && find . -path ./.stead -prune -o -type f -print "
        "| sort | xargs sha256sum | sha256sum"
    )
    for node in lab.nodes:
        summary = _sh(lab, node, digest).split()[0]
        conf = _sh(lab, node, "cat /srv/lab/app/conf/server.conf").strip()
        console.print(f"  {node:<10} tree sha256 {summary[:16]}…  server.conf: {conf!r}")

    _step("4. stead status")
    console.print(render_status(_status(lab)))
    lag = [n.get("lag_seconds") for n in _status(lab)["nodes"] if n["role"] == "passive"]
    console.print(f"  lag now: {json.dumps(lag)} s")

    _step("5. switchover: the secondary takes over, planned, with the client writing")
    _switchover_and_failover(lab)

    _step("8. reclone: patch the active's system trees, rebuild the secondary from them")
    _reclone(lab)

    _step("the lab is still running: explore it")
    console.print(
        "  .venv/bin/stead status                      # the cluster, from the active\n"
        "  .venv/bin/stead lab exec primary -- sh      # a shell on the active; write to /srv/lab\n"
        "  .venv/bin/stead lab exec secondary -- ls -l /srv/lab/app\n"
        "  .venv/bin/stead check                       # full system check of every passive\n"
        "  .venv/bin/stead lab exec client -- curl -s http://198.19.0.100:8080/whoami\n"
        "                                              # the demo service, as a client sees it\n"
        "  .venv/bin/stead lab partition secondary; .venv/bin/stead lab heal\n"
        "  .venv/bin/stead switchover --to primary     # planned role change, step by step\n"
        "  .venv/bin/stead lab kill tertiary; .venv/bin/stead lab start tertiary\n"
        "  .venv/bin/stead drift                       # what differs outside the protected set\n"
        "  .venv/bin/stead reclone tertiary --dry-run  # what a reclone would change\n"
        "  .venv/bin/stead reclone history\n"
        "  .venv/bin/stead lab down                    # remove the lab"
    )


if __name__ == "__main__":
    main()
