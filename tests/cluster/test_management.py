"""Management access and DNS: an SSH server in every node, reached by name from the client.

The client namespace resolves the nodes' management names through the hosts file the lab
manages, and the public name through the lab's DNS server (BIND's ``named``, authoritative for
``lab.test``), where the active agent publishes its own public-network address by signed
dynamic update and every agent registers its management name. A management name always
reaches its own node (with its own host name while passive, ``labsvc`` while active); the
public name reaches whichever node is active, through switchovers and failovers alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from clusterutil import wait_connected, wait_until
from failoverutil import PUBLIC, active_of, node_status, switchover, wait_active

from stead.lab import Lab
from stead.lab import dns as labdns

pytestmark = [pytest.mark.root, pytest.mark.cluster]

PUBLIC_NAME = "labsvc.lab.test"

# Runs in the client namespace: what the lab's DNS server answers (A records, no recursion).
DNS_ANSWERS = """
import json, sys
from stead.lab.dns import lookup
print(json.dumps({name: sorted(lookup(name, address=sys.argv[1])) for name in sys.argv[2:]}))
"""


def remote(lab: Lab, host: str, *command: str) -> str:
    result = lab.ssh(host, command)
    assert result.returncode == 0, f"ssh {host} {command}: {result.stderr}"
    return result.stdout


def hostname(lab: Lab, host: str) -> str:
    return remote(lab, host, "hostname").strip()


def whoami(lab: Lab, host: str) -> tuple[str, set[str]]:
    """Over SSH to ``host``: the host name there, and the IPv4 addresses of its pub0."""
    out = remote(lab, host, "sh", "-c", "hostname; ip -o -4 addr show dev pub0").splitlines()
    return out[0].strip(), {line.split()[3].split("/")[0] for line in out[1:]}


def dns_answers(lab: Lab, names: list[str]) -> dict[str, list[str]]:
    server = lab.status()["dns"]["address"]
    argv = [sys.executable, "-c", DNS_ANSWERS, server, *names]
    result = lab.exec("client", argv, capture=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def resolved(lab: Lab, name: str) -> str:
    """The address the client's own resolver (resolv.conf: the lab's server) gives."""
    result = lab.exec("client", ["getent", "ahostsv4", name], capture=True, timeout=30)
    assert result.returncode == 0, f"the client cannot resolve {name}: {result.stderr}"
    return result.stdout.split()[0]


def check_names(lab: Lab, active: str) -> None:
    """DNS and SSH by every name agree with the roles: ``active`` is the active node."""
    nodes = lab.nodes
    own = {name: node["public_address"] for name, node in lab.status()["nodes"].items()}
    # The server answers the active's own address for the public name, and each node's
    # management address for its management name; the client's resolver asks that server.
    answers = dns_answers(lab, [PUBLIC_NAME, *(f"{node}.lab.test" for node in nodes)])
    assert answers == {
        PUBLIC_NAME: [own[active]],
        **{f"{node}.lab.test": [own[node]] for node in nodes},
    }
    assert resolved(lab, PUBLIC_NAME) == resolved(lab, "labsvc") == own[active]
    # A returning node gives the public host name back as it turns passive: wait for it.
    passives = [node for node in nodes if node != active]
    wait_until(
        lambda: all(hostname(lab, f"{node}.lab.test") == node for node in passives),
        30,
        f"{', '.join(passives)} to have their own host names",
    )
    for node in nodes:
        name, addresses = whoami(lab, f"{node}.lab.test")
        if node == active:
            assert (name, addresses) == ("labsvc", {own[node], PUBLIC}), node
        else:
            assert (name, addresses) == (node, {own[node]}), node
        assert hostname(lab, node.upper()) == name  # the NetBIOS-style short name too
    assert whoami(lab, PUBLIC_NAME) == ("labsvc", {own[active], PUBLIC})
    assert hostname(lab, "labsvc") == "labsvc"  # the short public name, by the search domain


def fail_over(lab: Lab, active: str) -> str:
    """Node death (kill -9 of the agent, links down); the node returns as a passive.

    Returns the node that took over."""
    lab.kill(active)
    lab.partition(active)
    try:
        wait_until(lambda: active_of(lab) not in (None, active), 30, "a new active")
        successor = active_of(lab)
        assert successor is not None
        wait_active(lab, successor)
    finally:
        lab.heal(active)
    lab.start(active)
    wait_until(lambda: node_status(lab, active)["role"] == "passive", 30, f"{active} as passive")
    return successor


def test_names_and_dns_follow_the_role_through_switchovers_and_failovers(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    wait_active(built, "primary")
    check_names(built, "primary")

    active = "secondary"
    switchover(built, "primary", active)
    check_names(built, active)

    killed, active = active, fail_over(built, active)
    check_names(built, active)

    # To the node that was passive all along (the returning one may still be checking).
    (target,) = [node for node in built.nodes if node not in (killed, active)]
    switchover(built, active, target)
    active = target
    check_names(built, active)

    active = fail_over(built, active)
    check_names(built, active)

    # `stead lab ssh` is the same login from the command line, with ssh's exit code.
    cli = [sys.executable, "-m", "stead", "lab", "ssh", "tertiary.lab.test", "--"]
    env = dict(os.environ, STEAD_LAB_DIR=str(built.dir))
    proc = subprocess.run(
        [*cli, "hostname; exit 7"], capture_output=True, text=True, env=env, timeout=60
    )
    expected = "labsvc" if active == "tertiary" else "tertiary"
    assert (proc.returncode, proc.stdout) == (7, f"{expected}\n"), proc.stderr


def test_a_management_name_refuses_another_nodes_host_key(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd="sleep infinity", skip_init=True)
    assert hostname(built, "primary.lab.test") == "primary"
    # Point primary's names at secondary's address: its host key is not the one pinned.
    hosts = "/etc/netns/stead-client/hosts"
    with open(hosts) as source:
        original = source.read()
    try:
        with open(hosts, "w") as out:
            out.write(original.replace("198.19.0.11\t", "198.19.0.12\t"))
        result = built.ssh("primary.lab.test", ["hostname"])
        assert result.returncode == 255, result.stdout
        assert "host key verification failed" in result.stderr.lower(), result.stderr
    finally:
        with open(hosts, "w") as out:
            out.write(original)
    assert hostname(built, "primary.lab.test") == "primary"


def test_the_lab_dns_server_refuses_unsigned_updates(lab: Any) -> None:
    """Only the lab's TSIG key may change the zone: an unsigned update is refused."""
    import dns.query
    import dns.rcode
    import dns.update

    built: Lab = lab(2, agent_cmd="sleep infinity", skip_init=True)
    server = built.status()["dns"]
    update = dns.update.UpdateMessage(labdns.ZONE)
    update.replace("labsvc", 5, "A", "198.19.0.99")
    answer = dns.query.tcp(update, server["address"], timeout=5, port=server["port"])
    assert answer.rcode() == dns.rcode.REFUSED
    assert labdns.lookup("labsvc.lab.test.", address=server["address"]) == set()
