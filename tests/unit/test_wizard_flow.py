"""The wizard's questions, answered from a script: every answer is judged by the schema while
it is typed, an edit offers the current values and changes only what was answered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stead.config.load import load
from stead.config.wizard import (
    apply_plan,
    make_plan,
    merge_answers,
    new_draft,
    read_draft,
    resolve_target,
)
from stead.config.wizard_ask import Check, Prompt
from stead.config.wizard_flow import Wizard
from stead.config.wizard_rules import answer_error

Step = tuple[str, str | None]  # (part of the question, answer; None: Enter on the default)


@dataclass
class Script:
    """An asker that answers from a script and keeps what the checks refused."""

    steps: list[Step]
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    asked: list[Prompt] = field(default_factory=list)
    said: list[str] = field(default_factory=list)

    def ask(self, prompt: Prompt, check: Check) -> str:
        while True:
            assert self.steps, f"the script ended, but the wizard asks {prompt.label!r}"
            expected, answer = self.steps.pop(0)
            assert expected in prompt.label, f"asked {prompt.label!r}, script has {expected!r}"
            self.asked.append(prompt)
            text = prompt.default if answer is None else answer
            reason = check(text)
            if reason is None:
                return text
            self.rejected.append((expected, text, reason))

    def say(self, text: str) -> None:
        self.said.append(text)


NEW_CLUSTER: list[Step] = [
    ("Cluster name", "shop"),
    ("Node name", "Alpha"),  # refused: upper case
    ("Node name", "alpha"),
    ("Channel addresses", "10.0.0.1, 10.0.0.x"),  # refused
    ("Channel addresses", "10.0.0.1, 10.0.1.1"),
    ("Priority", None),
    ("take over without an operator", None),
    ("Management host name", None),  # the node name, offered
    ("FQDN", "alpha.example.com"),
    ("NetBIOS", "ALPHA-WITH-A-LONG-NAME"),  # refused: more than 15
    ("NetBIOS", ""),
    ("Management address", "10.1.0.1/24"),
    ("Interface", ""),  # refused: the address needs its interface
    ("Interface", "eth0"),
    ("Node name", "alpha"),  # refused: taken
    ("Node name", None),  # "secondary", offered
    ("Channel addresses", "10.0.0.2"),
    ("Priority", "-1"),  # refused
    ("Priority", None),
    ("take over without an operator", "maybe"),  # refused
    ("take over without an operator", "n"),
    ("Management host name", None),
    ("FQDN", None),  # secondary.example.com, from alpha's domain
    ("NetBIOS", None),
    ("Management address", ""),
    ("Add another node", None),
    ("active", "gamma"),  # refused: not a node
    ("active", "secondary"),
    ("Protected path", "srv"),  # refused: relative
    ("Protected path", "/srv/data"),
    ("Include", None),
    ("Exclude", "*.tmp, cache/**"),
    ("Add another protected path", "y"),
    ("Protected path", "/srv"),  # refused: overlaps /srv/data
    ("Protected path", "/var/lib/app"),
    ("Include", None),
    ("Exclude", None),
    ("Add another protected path", None),
    ("Public host name", "shop"),
    ("Public FQDN", "shop.example.com"),
    ("Public NetBIOS", "SHOP"),
    ("Public address", "198.51.100.10"),  # refused: no prefix
    ("Public address", "198.51.100.10/24"),
    ("Interface that carries", "eth0"),
    ("Public address", ""),
    ("TCP port", "80"),
    ("Add a service", "yes"),
    ("Service name", "web"),
    ("controlled", "exec"),
    ("Command line", "/usr/bin/web --port 'eighty"),  # refused: unbalanced quote
    ("Command line", "/usr/bin/web --port 80"),
    ("Health check", "tcp"),
    ("Address to connect to", None),
    ("Port to connect to", "0"),  # refused: a tcp check needs a port
    ("Port to connect to", "80"),
    ("Seconds between checks", None),
    ("Seconds one check may take", "5"),  # refused: longer than the interval
    ("Seconds one check may take", None),
    ("Failures in a row", None),
    ("Actions", "restart, alert"),
    ("Add another service", None),
    ("Witnesses", "198.51.100.1, 198.51.100.2:443"),
    ("Change the failover options", "y"),
    ("Seconds of silence", "1"),  # refused: less than 4 heartbeats
    ("Seconds of silence", "3"),
    ("Automatic failover at all", None),
    ("Only a passive in sync", None),
    ("No failover while", "no"),
    ("turns passive", None),
    ("Switch over when", None),
]


def test_a_new_cluster_from_the_questions(tmp_path: Path) -> None:
    script = Script(list(NEW_CLUSTER))
    draft = Wizard(script, new_draft(), new=True).run()
    assert not script.steps
    refused = [(label, text) for label, text, _ in script.rejected]
    assert refused == [
        ("Node name", "Alpha"),
        ("Channel addresses", "10.0.0.1, 10.0.0.x"),
        ("NetBIOS", "ALPHA-WITH-A-LONG-NAME"),
        ("Interface", ""),
        ("Node name", "alpha"),
        ("Priority", "-1"),
        ("take over without an operator", "maybe"),
        ("active", "gamma"),
        ("Protected path", "srv"),
        ("Protected path", "/srv"),
        ("Public address", "198.51.100.10"),
        ("Command line", "/usr/bin/web --port 'eighty"),
        ("Port to connect to", "0"),
        ("Seconds one check may take", "5"),
        ("Seconds of silence", "1"),
    ]
    messages = [reason for _, _, reason in script.rejected]
    assert "lower-case letters" in messages[0]
    assert "'10.0.0.x' is not an IP address" in messages[1]
    assert "1 to 15 characters" in messages[2]
    assert "address and interface go together" in messages[3]
    assert "node names must be unique: alpha" in messages[4]
    assert "overlap" in messages[9]
    assert "at least 4 heartbeats" in messages[14]

    out = tmp_path / "shop"
    apply_plan(make_plan(resolve_target(out, None), draft))
    config = load(out / "nodes" / "secondary").cluster
    assert config.cluster.active == "secondary"
    alpha, secondary = config.nodes
    assert alpha.addresses == ["10.0.0.1", "10.0.1.1"]
    assert alpha.management is not None and alpha.management.interface == "eth0"
    assert secondary.management is not None
    assert secondary.management.fqdn == "secondary.example.com"
    assert (secondary.priority, secondary.automatic_failover) == (110, False)
    assert [p.path for p in config.protected] == ["/srv/data", "/var/lib/app"]
    assert config.protected[0].exclude == ["*.tmp", "cache/**"]
    service = config.services[0]
    assert service.exec == ["/usr/bin/web", "--port", "80"]
    assert service.checks[0].port == 80 and service.checks[0].actions == ["restart", "alert"]
    assert config.failover.timeout == 3.0 and config.failover.public_check is False
    assert config.failover.witnesses == ["198.51.100.1", "198.51.100.2:443"]
    assert config.public.addresses[0].interface == "eth0"


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    out = tmp_path / "cluster"
    answers = {
        "cluster": {"name": "shop"},
        "nodes": [
            {"name": "alpha", "addresses": ["10.0.0.1"], "management": {"hostname": "alpha"}},
            {"name": "beta", "addresses": ["10.0.0.2"]},
        ],
        "protected": [{"path": "/srv/data"}],
        "services": [{"name": "web", "unit": "nginx.service"}],
    }
    draft = merge_answers(new_draft(), answers, source="a", new=True)
    apply_plan(make_plan(resolve_target(out, None), draft))
    return out


KEEP_ALL: list[Step] = [
    ("Cluster name", None),
    ("Node alpha", None),
    ("Node beta", None),
    ("Add a node", None),
    ("active", None),
    ("Protected path /srv/data", None),
    ("Add another protected path", None),
    ("Public host name", None),
    ("Public FQDN", None),
    ("Public NetBIOS", None),
    ("Public address", None),
    ("TCP port", None),
    ("Service web", None),
    ("Add another service", None),
    ("Witnesses", None),
    ("Change the failover options", None),
]


def test_an_edit_answered_with_enter_changes_nothing(cluster: Path) -> None:
    target = resolve_target(None, cluster)
    before = read_draft(target)
    script = Script(list(KEEP_ALL))
    draft = Wizard(script, before, new=False).run()
    assert not script.steps and not script.rejected
    assert draft == before
    assert not make_plan(target, draft).changed


def test_an_edit_offers_current_values_and_changes_only_the_answer(cluster: Path) -> None:
    target = resolve_target(None, cluster)
    steps = list(KEEP_ALL)
    beta = steps.index(("Node beta", None))
    steps[beta : beta + 1] = [
        ("Node beta", "edit"),
        ("Channel addresses of beta", None),
        ("Priority of beta", "5"),
        ("take over without an operator", None),
        ("Management host name of beta", None),
    ]
    script = Script(steps)
    draft = Wizard(script, read_draft(target), new=False).run()
    offered = {p.label.split(" (")[0]: p.default for p in script.asked}
    assert offered["Channel addresses of beta"] == "10.0.0.2"
    assert offered["Priority of beta"] == "110"
    plan = make_plan(target, draft)
    changed = [
        line.split("#")[0].strip()
        for line in plan.diff().splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    assert changed == ["-priority = 110", "+priority = 5"]


def test_an_edit_can_add_remove_and_refuses_to_drop_below_two_nodes(cluster: Path) -> None:
    target = resolve_target(None, cluster)
    steps = list(KEEP_ALL)
    at = steps.index(("Node alpha", None))
    steps[at : at + 3] = [
        ("Node alpha", "remove"),  # refused: two nodes at least; asked again
        ("Node alpha", None),
        ("Node beta", None),
        ("Add a node", "y"),
        ("Node name", None),  # tertiary
        ("Channel addresses", "10.0.0.3"),
        ("Priority", None),
        ("take over without an operator", None),
        ("Management host name", ""),
        ("Add a node", None),
    ]
    at = steps.index(("Service web", None))
    steps[at] = ("Service web", "remove")
    steps[steps.index(("Add another service", None))] = ("Add a service", None)
    script = Script(steps)
    draft = Wizard(script, read_draft(target), new=False, cannot_add_nodes=None).run()
    assert not script.steps
    plan = make_plan(target, draft)
    assert plan.added == ["tertiary"]
    apply_plan(plan)
    config = load(cluster / "nodes" / "tertiary").cluster
    assert [n.name for n in config.nodes] == ["alpha", "beta", "tertiary"]
    assert config.node("tertiary").priority == 120
    assert config.services == []
    assert "\n[[services]]" not in (cluster / "cluster.toml").read_text()


def test_adding_a_node_without_ca_key_is_refused_at_once(cluster: Path) -> None:
    target = resolve_target(None, cluster / "nodes" / "alpha")  # a node's own directory
    reason = target.cannot_add_nodes()
    assert reason is not None and "ca.key" in reason
    steps = list(KEEP_ALL)
    steps[steps.index(("Add a node", None))] = ("Add a node", "y")
    script = Script(steps)
    draft = Wizard(script, read_draft(target), new=False, cannot_add_nodes=reason).run()
    assert reason in script.said
    assert not make_plan(target, draft).changed


def test_answer_error_uses_the_cluster_wide_rules() -> None:
    draft = new_draft()
    draft["nodes"] = [{"name": "alpha", "addresses": ["10.0.0.1"]}]
    draft["nodes"].append({"name": "new-node-1", "addresses": ["192.0.2.1"]})
    assert "unique" in (answer_error(draft, ("nodes", 1, "name"), "alpha") or "")
    assert answer_error(draft, ("nodes", 1, "name"), "beta") is None
    assert "4 heartbeats" in (answer_error(draft, ("failover", "timeout"), 1.5) or "")
    assert answer_error(draft, ("failover", "timeout"), 2.5) is None
