"""Management access: an SSH server in every node, reached by name from the client.

The client namespace resolves the nodes' management names and the public name through the
hosts file the lab manages, and logs in with the lab's client key. A management name always
reaches its own node (with its own host name while passive); the public name reaches
whichever node is active, before and after a switchover.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from clusterutil import wait_connected, wait_until
from failoverutil import switchover, wait_active

from stead.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def remote(lab: Lab, host: str, *command: str) -> str:
    result = lab.ssh(host, command)
    assert result.returncode == 0, f"ssh {host} {command}: {result.stderr}"
    return result.stdout


def hostname(lab: Lab, host: str) -> str:
    return remote(lab, host, "hostname").strip()


def test_management_and_public_names_follow_the_roles(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    wait_active(built, "primary")

    # The active has the public host name; a passive keeps its own.
    assert hostname(built, "primary.lab.test") == "labsvc"
    assert hostname(built, "secondary.lab.test") == "secondary"
    assert hostname(built, "TERTIARY") == "tertiary"  # the NetBIOS-style short name too
    assert remote(built, "labsvc.lab.test", "cat", "/proc/sys/kernel/hostname") == "labsvc\n"
    assert "198.19.0.11/" in remote(built, "labsvc.lab.test", "ip", "-o", "addr", "show", "pub0")

    switchover(built, "primary", "secondary")
    wait_until(lambda: hostname(built, "primary.lab.test") == "primary", 15, "primary's name")
    assert hostname(built, "secondary.lab.test") == "labsvc"
    # The public name now reaches secondary; its host key differs from primary's, and the
    # client accepts it because the lab lists every node's key for the public name.
    pub0 = remote(built, "labsvc.lab.test", "ip", "-o", "addr", "show", "pub0")
    assert "198.19.0.12/" in pub0 and "198.19.0.100/" in pub0
    assert remote(built, "labsvc", "cat", "/proc/sys/kernel/hostname") == "labsvc\n"

    # `stead lab ssh` is the same login from the command line, with ssh's exit code.
    cli = [sys.executable, "-m", "stead", "lab", "ssh", "tertiary.lab.test", "--"]
    env = dict(os.environ, STEAD_LAB_DIR=str(built.dir))
    proc = subprocess.run(
        [*cli, "hostname; exit 7"], capture_output=True, text=True, env=env, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (7, "tertiary\n"), proc.stderr


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
