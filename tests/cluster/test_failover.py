"""Failover and switchover between real agents, seen by a client on the public network.

The client namespace reaches the cluster only through the public service address; it
writes keys to the lab's demo service and samples which node answers. Each test checks that
epochs only grow, that no two nodes are active in one epoch, that every write acknowledged
before a planned switchover is on the new active, and that the cluster converges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clusterutil import assert_converged, wait_connected, wait_until
from failoverutil import (
    PORT,
    PUBLIC,
    Client,
    active_of,
    agent,
    epochs_only_grow,
    holders,
    node_status,
    read_key,
    roles,
    sample_roles,
    switchover,
    wait_active,
)

from stead.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def _up(lab: Any, n: int = 3) -> Lab:
    built: Lab = lab(n)
    wait_connected(built)
    wait_active(built, "primary")
    return built


def _wait_sync(built: Lab, active: str) -> None:
    result = built.exec(active, ["stead", "wait-sync", "--timeout", "60"], capture=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_switchover_back_and_forth_keeps_every_acknowledged_write(lab: Any) -> None:
    built = _up(lab)
    client = Client(built)
    history = []
    try:
        pairs = [("primary", "secondary"), ("secondary", "primary")] * 10
        for source, target in pairs:
            time.sleep(1.0)  # let the client write to this active for a while (load, not sync)
            job = switchover(built, source, target)
            steps = [step["step"] for step in job["result"]["steps"]]
            assert steps[0] == "stop services" and steps[-1] == "hand over", steps
            history.append(roles(built))
            assert holders(built) == [target]
    finally:
        samples = client.stop()
    epochs_only_grow(history)
    assert samples.acked, "the client never got a write acknowledged"
    # Every acknowledged write is on the final active (the client reads it there).
    missing = [i for i in samples.acked if read_key(built, f"w{i}") != f"value {i}"]
    assert not missing, f"acknowledged writes lost: {missing[:20]}"
    # Management identity: the passive keeps its own host name, the active has the public one.
    for node, expected in (("primary", "labsvc"), ("secondary", "secondary")):
        result = built.exec(node, ["hostname"], capture=True)
        assert result.stdout.strip() == expected, (node, result.stdout)
    listing = built.exec("primary", ["stead", "inventory", "--format", "json"], capture=True)
    inventory = json.loads(listing.stdout)
    assert {n["name"]: n["role"] for n in inventory["nodes"]} == {
        "primary": "active",
        "secondary": "passive",
        "tertiary": "passive",
    }
    assert inventory["public"]["holder"] == "primary"
    hosts = built.exec("primary", ["stead", "inventory", "--format", "hosts"], capture=True)
    assert "198.19.0.12\tsecondary.lab.test secondary" in hosts.stdout, hosts.stdout
    answered = {node for node in samples.answered_by() if node}
    assert answered == {"primary", "secondary"}, (len(samples.rows), samples.rows[-5:])
    _wait_sync(built, "primary")
    assert_converged(built)


def test_kill_of_the_active_node_fails_over_and_it_returns_as_passive(lab: Any) -> None:
    built = _up(lab)
    client = Client(built)
    try:
        time.sleep(1.0)  # let the client write for a while before the crash
        # Node death: the agent and its services die, and its links go down.
        built.kill("primary")
        built.partition("primary")
        started = time.monotonic()
        wait_until(lambda: active_of(built) in ("secondary", "tertiary"), 30, "a new active")
        successor = active_of(built)
        assert successor is not None
        wait_active(built, successor)
        took = time.monotonic() - started
        history = sample_roles(built, 2.0)
    finally:
        samples = client.stop()
    assert took < 15, f"failover took {took:.1f} s"
    epochs_only_grow(history)
    # The old active returns: it sees the newer epoch and rejoins as passive.
    built.heal("primary")
    built.start("primary")
    wait_until(lambda: node_status(built, "primary")["role"] == "passive", 30, "primary as passive")
    assert holders(built) == [successor]
    wait_until(
        lambda: (
            node_status(built, successor)["nodes"][1:]
            and all(n["state"] == "in sync" for n in node_status(built, successor)["nodes"][1:])
        ),
        120,
        "every passive in sync with the new active",
    )
    _wait_sync(built, successor)
    assert_converged(built)
    assert samples.longest_outage() < 15


def test_returning_active_keeps_what_it_wrote_after_the_fork_in_quarantine(lab: Any) -> None:
    built = _up(lab)
    built.partition("primary")  # fully isolated: it fences itself, a passive takes over
    built.exec("primary", ["sh", "-c", "echo divergent > /srv/lab/after-fork.txt"])
    wait_until(lambda: active_of(built) in ("secondary", "tertiary"), 30, "a new active")
    successor = active_of(built)
    assert successor is not None
    wait_until(lambda: node_status(built, "primary")["role"] == "passive", 30, "primary fenced")
    built.heal("primary")
    wait_until(
        lambda: any(
            item["path"] == "after-fork.txt"
            for generation in agent(built, "primary").call("GET", "/v1/quarantine")["generations"]
            for item in generation["files"]
        ),
        120,
        "after-fork.txt in primary's quarantine",
    )
    listing = built.exec("primary", ["stead", "quarantine", "list"], capture=True)
    assert "after-fork.txt" in listing.stdout, listing.stdout + listing.stderr
    wait_active(built, successor)
    _wait_sync(built, successor)
    assert_converged(built)


def test_channel_cut_with_the_public_network_up_does_not_fail_over(lab: Any) -> None:
    built = _up(lab)
    before = roles(built)
    built.partition("primary", network="channel")
    try:
        history = sample_roles(built, 4 * built_timeout(built))
    finally:
        built.heal("primary")
    assert all(snapshot.get("primary", ("?", 0))[0] == "active" for snapshot in history)
    assert roles(built)["primary"] == before["primary"]
    assert holders(built) == ["primary"]


def test_a_partitioned_minority_never_promotes(lab: Any) -> None:
    built = _up(lab)
    built.partition("tertiary")
    try:
        history = sample_roles(built, 4 * built_timeout(built))
    finally:
        built.heal("tertiary")
    assert all(snapshot.get("tertiary", ("passive", 0))[0] == "passive" for snapshot in history)
    assert active_of(built) == "primary"


def test_sigstopped_active_steps_down_after_sigcont(lab: Any) -> None:
    built = _up(lab)
    built.sigstop("primary")
    try:
        wait_until(lambda: active_of_others(built) is not None, 30, "a passive to take over")
        successor = active_of_others(built)
        assert successor is not None
        wait_active(built, successor)
    finally:
        built.sigcont("primary")
    wait_until(lambda: node_status(built, "primary")["role"] == "passive", 30, "primary steps down")
    wait_until(lambda: holders(built) == [successor], 15, "one holder of the public address")
    assert active_of(built) == successor


def active_of_others(built: Lab) -> str | None:
    found = [n for n, (role, _) in roles(built).items() if role == "active" and n != "primary"]
    return found[0] if found else None


def built_timeout(built: Lab) -> float:
    for node in built.nodes:
        try:
            return float(node_status(built, node, timeout=2).get("failover_timeout", 2.0))
        except Exception:  # a stopped agent: ask the next node
            continue
    return 2.0


def test_active_that_loses_its_witnesses_switches_over_to_a_passive_that_reaches_them(
    lab: Any,
) -> None:
    built = _up(lab)
    built.partition("primary", network="public")  # the gateway (witness) is gone for it
    try:
        wait_until(lambda: active_of(built) in ("secondary", "tertiary"), 30, "a switchover")
        successor = active_of(built)
        assert successor is not None
        wait_active(built, successor)
        assert roles(built)["primary"][0] == "passive"
    finally:
        built.heal("primary")
    wait_until(lambda: holders(built) == [successor], 15, "one holder of the public address")


def _kill_demo(built: Lab, node: str) -> None:
    built.exec(node, ["pkill", "-f", "stead.lab.demo_service"], capture=True)


def _demo_pid(built: Lab, node: str) -> str:
    """The demo service's pid in this node's network namespace ("" if none): the lab
    shares one pid namespace, so pgrep alone would see every node's service."""
    pids = subprocess.run(
        ["ip", "netns", "pids", f"stead-{node}"], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"stead.lab.demo_service" in cmdline:
            return pid
    return ""


def test_a_failing_service_is_restarted_twice_then_switched_over(lab: Any) -> None:
    built = _up(lab)
    for _ in range(2):
        before = _demo_pid(built, "primary")
        _kill_demo(built, "primary")
        wait_until(
            lambda before=before: _demo_pid(built, "primary") not in ("", before),
            30,
            "the demo service restarted on primary",
        )
        assert active_of(built) == "primary"
    _kill_demo(built, "primary")
    wait_until(lambda: active_of(built) in ("secondary", "tertiary"), 60, "a switchover")
    successor = active_of(built)
    assert successor is not None
    wait_active(built, successor)
    assert _demo_pid(built, "primary") == ""


def test_maintenance_stops_acting_and_replication_goes_on(lab: Any) -> None:
    built = _up(lab)
    result = built.exec("primary", ["stead", "maintenance", "on"], capture=True)
    assert result.returncode == 0, result.stderr
    for node in ("secondary", "tertiary"):
        agent(built, node).call("POST", "/v1/maintenance", {"on": True})
    _kill_demo(built, "primary")
    built.exec("primary", ["sh", "-c", "echo during-maintenance > /srv/lab/m.txt"])
    _wait_sync(built, "primary")
    sample_roles(built, 2 * built_timeout(built))
    assert _demo_pid(built, "primary") == "", "maintenance must not restart services"
    assert active_of(built) == "primary"
    assert_converged(built)
    for node in built.nodes:
        agent(built, node).call("POST", "/v1/maintenance", {"on": False})
    wait_until(lambda: _demo_pid(built, "primary") != "", 30, "monitoring to resume")


def test_forced_failover_when_automatic_failover_is_off(lab: Any) -> None:
    from clusterutil import set_cluster_option

    built = _up(lab)
    set_cluster_option(built, "automatic = true", "automatic = false")
    wait_connected(built)
    wait_active(built, "primary")
    built.kill("primary")
    built.partition("primary")
    try:
        history = sample_roles(built, 3 * built_timeout(built))
        assert all(
            role == "passive"
            for snapshot in history
            for node, (role, _) in snapshot.items()
            if node != "primary"
        ), "no automatic failover while failover.automatic is off"
        result = built.exec(
            "secondary", ["stead", "failover", "--to", "secondary", "--yes"], capture=True
        )
        assert result.returncode == 0, result.stderr + result.stdout
        assert "lost" in result.stderr
        wait_active(built, "secondary")
    finally:
        built.heal("primary")
    built.start("primary")
    wait_until(lambda: node_status(built, "primary")["role"] == "passive", 30, "primary as passive")


def settled_active(built: Lab, timeout: float = 60.0) -> str:
    """The one active, once it has stayed the one active for a failover timeout: right
    after a flapping link, a decision may still be under way (one active seen, then none
    while the role moves)."""
    settle = built_timeout(built) + 0.5
    seen: list[tuple[str | None, float]] = [(None, time.monotonic())]

    def settled() -> bool:
        now, current = time.monotonic(), active_of(built)
        if current != seen[-1][0]:
            seen.append((current, now))
        return current is not None and now - seen[-1][1] >= settle

    wait_until(settled, timeout, "one active that stays active after the flapping")
    found = seen[-1][0]
    assert found is not None
    return found


def test_a_flapping_link_never_makes_two_actives_in_one_epoch(lab: Any) -> None:
    built = _up(lab)
    history = []
    for _ in range(8):
        built.partition("primary")
        history += sample_roles(built, 0.6, interval=0.1)
        built.heal("primary")
        history += sample_roles(built, 0.6, interval=0.1)
    epochs_only_grow(history)
    final = settled_active(built)
    wait_active(built, final)
    assert holders(built) == [final]
    try:
        wait_until(
            lambda: all(n["state"] == "in sync" for n in node_status(built, final)["nodes"][1:]),
            120,
            "every passive in sync",
        )
    except AssertionError as exc:  # say what each node saw, for the next one to read
        seen = {n: agent(built, n).call("GET", "/v1/events?limit=30") for n in built.nodes}
        raise AssertionError(f"{exc}: {node_status(built, final)} {seen}") from None
    _wait_sync(built, final)
    assert_converged(built)


HTTPLOAD = Path(__file__).resolve().parents[2] / "bench" / "httpload.py"


def test_a_sustained_stream_of_atomic_saves_never_fails_over(lab: Any) -> None:
    """1,000 writes/s to the demo service (temp file, fsync, rename: an atomic save each)
    for 20 s. Capture once did a scan of everything queued for every rename, so a backlog
    grew quadratically until the active's event loop stopped sending heartbeats and a
    passive took over. The active must stay active, in one epoch, and the cluster converge."""
    built = _up(lab)
    before = roles(built)
    out = built.dir / "sustained-load.json"
    load = built.popen(
        "client",
        [sys.executable, str(HTTPLOAD), f"http://{PUBLIC}:{PORT}", "1000", "20", str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert load.stdout is not None
        assert json.loads(load.stdout.readline()).get("ready"), "load client did not start"
        history = sample_roles(built, 20.0, interval=0.5)
    finally:
        load.terminate()
        load.communicate(timeout=120)
    epochs_only_grow([before, *history])
    changed = [h for h in history if h.get("primary") != before["primary"]]
    assert not changed, f"the active changed under load: {changed[:3]}"
    writes = json.loads(out.read_text())["writes"]
    assert sum(1 for _, ok in writes if ok) > 2000, "the demo service took too few writes"
    _wait_sync(built, "primary")
    assert_converged(built)
