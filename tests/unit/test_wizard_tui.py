"""stead configure in a real pseudo-terminal: the reason an answer is refused shows while it is
typed, Enter is refused until it is fixed, and the files written load."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from stead.config.load import load
from stead.config.wizard import apply_plan, make_plan, merge_answers, new_draft, resolve_target

CLEAR = "\x15"  # Ctrl-U: clear the answer offered


Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    children: list[pexpect.spawn] = []

    def start(*args: str) -> pexpect.spawn:
        env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "NO_COLOR": "1"}
        child = pexpect.spawn(
            sys.executable,
            ["-m", "stead.cli.configure", *args],
            env=env,
            dimensions=(40, 200),
            encoding="utf-8",
            timeout=15,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.close(force=True)


def answer(child: pexpect.spawn, question: str, text: str | None = None) -> None:
    """Wait for the question, then replace the offered answer by ``text`` (None: Enter)."""
    child.expect_exact(question)
    child.send("\r" if text is None else f"{CLEAR}{text}\r")


def refused_while_typed(
    child: pexpect.spawn, question: str, text: str, reason: str, then: str
) -> None:
    """Type a bad answer: its reason shows before Enter, and Enter does not move on."""
    child.expect_exact(question)
    child.send(f"{CLEAR}{text}")
    child.expect_exact(reason)
    child.send("\r")
    with pytest.raises(pexpect.TIMEOUT):
        child.expect_exact(then, timeout=0.7)


def test_a_new_cluster_in_a_terminal(spawn: Spawn, tmp_path: Path) -> None:
    out = tmp_path / "shop"
    child = spawn("--out", str(out))
    answer(child, "Cluster name", "shop")
    refused_while_typed(child, "Node name", "Bad_Name", "lower-case letters", then="Channel")
    child.send(f"{CLEAR}alpha\r")
    answer(child, "Channel addresses of alpha", "10.0.0.1")
    answer(child, "Priority of alpha")
    answer(child, "take over without an operator")
    answer(child, "Management host name of alpha")
    answer(child, "FQDN of alpha", "alpha.example.com")
    refused_while_typed(
        child, "NetBIOS short name", "WAY-TOO-LONG-A-NAME", "1 to 15 characters", then="Manage"
    )
    child.send(f"{CLEAR}\r")
    answer(child, "Management address of alpha", "10.1.0.1/24")
    child.expect_exact("Interface of 10.1.0.1/24")
    child.send("\r")  # empty: refused, the address needs its interface
    child.expect_exact("address and interface go together")
    child.send("eth0\r")
    answer(child, "Node name")  # secondary, offered
    answer(child, "Channel addresses of secondary", "10.0.0.2")
    answer(child, "Priority of secondary")
    answer(child, "take over without an operator", "n")
    answer(child, "Management host name of secondary", "")
    answer(child, "Add another node")
    answer(child, "active")
    refused_while_typed(child, "Protected path", "srv", "absolute path", then="Include")
    child.send(f"{CLEAR}/srv/data\r")
    answer(child, "Include globs")
    answer(child, "Exclude globs", "*.tmp")
    answer(child, "Add another protected path")
    answer(child, "Public host name", "shop")
    answer(child, "Public FQDN")
    answer(child, "Public NetBIOS")
    answer(child, "Public address", "198.51.100.10/24")
    answer(child, "Interface that carries", "eth0")
    answer(child, "Public address")
    answer(child, "TCP port")
    answer(child, "Add a service")
    answer(child, "Witnesses", "198.51.100.1")
    answer(child, "Change the failover options")
    answer(child, "Create this cluster")
    child.expect_exact("cluster configuration created")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    for name in ("alpha", "secondary"):
        assert load(out / "nodes" / name).name == name
    config = load(out / "nodes" / "alpha").cluster
    assert config.node("alpha").management is not None
    assert config.node("secondary").automatic_failover is False
    assert config.public.addresses[0].address == "198.51.100.10/24"
    assert config.failover.witnesses == ["198.51.100.1"]


def test_an_edit_in_a_terminal_shows_the_diff_and_asks(spawn: Spawn, tmp_path: Path) -> None:
    out = tmp_path / "shop"
    answers = {
        "cluster": {"name": "shop"},
        "nodes": [
            {"name": "alpha", "addresses": ["10.0.0.1"]},
            {"name": "beta", "addresses": ["10.0.0.2"]},
        ],
        "protected": [{"path": "/srv/data"}],
    }
    apply_plan(
        make_plan(
            resolve_target(out, None), merge_answers(new_draft(), answers, source="a", new=True)
        )
    )
    before = (out / "cluster.toml").read_text()
    child = spawn("--config-dir", str(out))
    answer(child, "Cluster name")  # "shop", offered
    answer(child, "Node alpha")
    answer(child, "Node beta")
    answer(child, "Add a node")
    answer(child, "active")
    answer(child, "Protected path /srv/data")
    answer(child, "Add another protected path")
    for question in ("Public host name", "Public FQDN", "Public NetBIOS", "Public address"):
        answer(child, question)
    answer(child, "TCP port")
    answer(child, "Add a service")
    answer(child, "Witnesses")
    answer(child, "Change the failover options", "y")
    refused_while_typed(
        child, "Seconds of silence", "1", "at least 4 heartbeats", then="Automatic failover"
    )
    child.send(f"{CLEAR}3\r")
    for question in ("Automatic", "Only a passive", "No failover while", "turns passive", "Switch"):
        answer(child, question)
    child.expect_exact("+timeout = 3.0")
    answer(child, "Write these changes", "n")
    child.expect_exact("nothing written")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert (out / "cluster.toml").read_text() == before


def test_ctrl_c_writes_nothing(spawn: Spawn, tmp_path: Path) -> None:
    out = tmp_path / "shop"
    child = spawn("--out", str(out))
    answer(child, "Cluster name", "shop")
    child.expect_exact("Node name")
    child.sendcontrol("c")
    child.expect_exact("cancelled: nothing written")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert not out.exists()
