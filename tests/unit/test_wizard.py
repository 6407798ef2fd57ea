"""stead configure from an answers file: valid answers give files that load, bad ones name
the key and the reason and write nothing, and an edit changes only what was asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from stead import pki
from stead.config.load import load
from stead.config.wizard import (
    apply_plan,
    make_plan,
    merge_answers,
    new_draft,
    read_answers,
    read_draft,
    resolve_target,
)
from stead.config.wizard_toml import sync_document
from stead.errors import ConfigError, UsageError

ANSWERS = """\
[cluster]
name = "shop"
active = "beta"

[[nodes]]
name = "alpha"
addresses = ["10.0.0.1"]
management = { hostname = "alpha", fqdn = "alpha.example.com", short_name = "ALPHA", \
address = "10.1.0.1/24", interface = "eth0" }

[[nodes]]
name = "beta"
addresses = ["10.0.0.2", "10.0.1.2"]
priority = 50
automatic_failover = false

[[protected]]
path = "/srv/data"
exclude = ["*.tmp"]

[public]
hostname = "shop"
fqdn = "shop.example.com"
short_name = "SHOP"
addresses = [{ address = "198.51.100.10/24", interface = "eth0" }]
service_port = 80

[[services]]
name = "web"
unit = "nginx.service"
[[services.checks]]
kind = "http"
url = "http://127.0.0.1/"

[failover]
timeout = 3.0
witnesses = ["198.51.100.1"]
"""


def _configure(out: Path, answers: dict[str, Any] | str, *, name: str = "a.toml") -> list[Path]:
    """Run the answers path the way the CLI does; returns the node directories written."""
    file = out.parent / name
    if isinstance(answers, str):
        file.write_text(answers)
    else:
        file.write_text(json.dumps(answers) if name.endswith(".json") else tomlkit.dumps(answers))
    target = resolve_target(out, None)
    base = read_draft(target) if target.existing else new_draft()
    draft = merge_answers(base, read_answers(file), source=str(file), new=not target.existing)
    return apply_plan(make_plan(target, draft, source=str(file)))


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    out = tmp_path / "cluster"
    _configure(out, ANSWERS)
    return out


def test_answers_make_a_cluster_whose_every_node_directory_loads(cluster: Path) -> None:
    for name in ("alpha", "beta"):
        loaded = load(cluster / "nodes" / name)
        assert loaded.name == name
    config = load(cluster / "nodes" / "alpha").cluster
    assert config.cluster.name == "shop"
    assert config.cluster.active == "beta"
    assert [n.priority for n in config.nodes] == [100, 50]  # 100 as `stead init` gives
    assert config.nodes[1].automatic_failover is False
    management = config.nodes[0].management
    assert management is not None
    assert (management.short_name, management.interface) == ("ALPHA", "eth0")
    assert config.public.addresses[0].address == "198.51.100.10/24"
    assert config.protected[0].exclude == ["*.tmp"]
    assert config.services[0].checks[0].url == "http://127.0.0.1/"
    assert config.failover.timeout == 3.0
    assert config.failover.witnesses == ["198.51.100.1"]
    text = (cluster / "cluster.toml").read_text()
    assert "# the node that is active when the cluster first starts" in text  # init's comments
    assert text == (cluster / "nodes" / "beta" / "cluster.toml").read_text()
    assert (cluster / "ca.key").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in cluster.parent.iterdir()) == ["a.toml", "cluster"]


def test_json_answers_work_too(tmp_path: Path) -> None:
    answers = tomllib.loads(ANSWERS)
    _configure(tmp_path / "c", answers, name="a.json")
    assert load(tmp_path / "c" / "nodes" / "beta").cluster.public.short_name == "SHOP"


def _with(path: str, value: Any) -> dict[str, Any]:
    """The valid answers with one value replaced (``nodes.0.name``; a None value removes)."""
    answers = tomllib.loads(ANSWERS)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = answers
    for part in parents:
        target = target[part]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return answers


BAD_ANSWERS = [
    ("nodes.0.name", "Alpha_1", "nodes.0.name", "lower-case letters"),
    ("nodes.1.addresses", ["10.0.0.x"], "nodes.1.addresses", "'10.0.0.x' is not an IP address"),
    ("nodes.0.management.short_name", "A" * 16, "short_name", "1 to 15 characters"),
    ("nodes.0.management.fqdn", "other.example.com", "management", "must be alpha.<domain>"),
    ("nodes.0.management.interface", None, "management", "address and interface go together"),
    ("nodes.1.name", "alpha", "(top level)", "node names must be unique: alpha"),
    ("cluster.active", "gamma", "(top level)", "'gamma' is not a configured node"),
    ("protected", [{"path": "/srv"}, {"path": "/srv/data"}], "(top level)", "overlap"),
    ("protected.0.path", "srv/data", "protected.0.path", "absolute path"),
    ("failover.timeout", 1.0, "(top level)", "at least 4 heartbeats"),
    ("failover.witnesses", ["gateway"], "failover.witnesses", "is not an IP address"),
    ("public.addresses.0.address", "198.51.100.10", "public.addresses.0.address", "prefix"),
    ("services.0.exec", ["/bin/web"], "services.0", "exactly one of unit, exec"),
    ("services.0.checks.0.url", "", "services.0.checks.0", "needs url"),
    ("nodes.0.colour", "blue", "nodes.0.colour", "unknown key"),
    ("cluster.id", "12345678-1234", "cluster.id", "generated by stead"),
]


@pytest.mark.parametrize(("path", "value", "key", "reason"), BAD_ANSWERS)
def test_each_bad_answer_names_its_key_and_reason_and_writes_nothing(
    tmp_path: Path, path: str, value: Any, key: str, reason: str
) -> None:
    out = tmp_path / "cluster"
    with pytest.raises(ConfigError) as caught:
        _configure(out, _with(path, value))
    problems = " | ".join(caught.value.problems)
    assert key in problems
    assert reason in problems
    assert "a.toml" in problems  # the file is named
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.toml"]  # no staging leftovers


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"cluster": 3}, "cluster: Input should be a valid dictionary"),
        ({"nodes": "alpha"}, "nodes: Input should be a valid list"),
        ({"nodes": [1, 2]}, "nodes.0: Input should be a valid dictionary"),
        ({"nodes": [{"name": ["x"]}, {"name": "b"}]}, "nodes.0.name: Input should be a valid"),
        ({"public": []}, "public: Input should be a valid dictionary"),
        ({"cluster": {"name": "x"}}, "nodes: List should have at least 2 items"),
    ],
)
def test_malformed_answers_are_errors_not_crashes(
    tmp_path: Path, answers: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _configure(tmp_path / "c", answers)
    assert reason in " | ".join(caught.value.problems)
    assert not (tmp_path / "c").exists()


def test_unreadable_answers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        _configure(tmp_path / "c", "[cluster\nname = 1")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _configure(tmp_path / "c", "{", name="a.json")
    with pytest.raises(ConfigError, match="file not found"):
        read_answers(tmp_path / "missing.toml")
    assert not (tmp_path / "c").exists()


def test_an_edit_changes_only_what_was_asked_and_shows_the_diff(cluster: Path) -> None:
    before = (cluster / "cluster.toml").read_text()
    target = resolve_target(None, cluster)
    draft = merge_answers(read_draft(target), {"failover": {"timeout": 4.0}}, source="a", new=False)
    plan = make_plan(target, draft)
    changed = [
        line
        for line in plan.diff().splitlines()
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]
    assert [line.split("#")[0].strip() for line in changed] == ["-timeout = 3.0", "+timeout = 4.0"]
    apply_plan(plan)
    after = (cluster / "cluster.toml").read_text()
    differ = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(differ) == 1
    assert "# active silent on every channel" in differ[0][1]  # its comment stays
    for name in ("alpha", "beta"):
        assert (cluster / "nodes" / name / "cluster.toml").read_text() == after
        assert load(cluster / "nodes" / name).cluster.failover.timeout == 4.0


def test_an_edit_that_changes_nothing_writes_nothing(cluster: Path) -> None:
    target = resolve_target(cluster, None)  # --out on an existing cluster edits it
    assert target.existing
    draft = merge_answers(
        read_draft(target), {"nodes": [{"name": "alpha"}, {"name": "beta"}]}, source="a", new=False
    )
    assert not make_plan(target, draft).changed


def test_adding_a_node_issues_its_certificate_from_ca_key(cluster: Path) -> None:
    answers = {
        "nodes": [
            {"name": "alpha"},
            {"name": "beta"},
            {"name": "gamma", "addresses": ["10.0.0.3"]},
        ]
    }
    written = _configure(cluster, answers)
    gamma = cluster / "nodes" / "gamma"
    assert gamma in written
    loaded = load(gamma)
    assert loaded.cluster.node("gamma").priority == 110  # after the highest so far (alpha)
    assert pki.cert_common_name((gamma / "node.pem").read_bytes()) == "gamma"
    assert (gamma / "node.key").stat().st_mode & 0o077 == 0
    assert load(cluster / "nodes" / "alpha").cluster.node("alpha").management is not None


def test_adding_a_node_without_the_ca_key_says_so_and_writes_nothing(cluster: Path) -> None:
    (cluster / "ca.key").unlink()
    before = (cluster / "cluster.toml").read_text()
    answers = {
        "nodes": [{"name": "alpha"}, {"name": "beta"}, {"name": "gamma", "addresses": ["10.0.0.3"]}]
    }
    with pytest.raises(UsageError, match=r"CA key .*ca\.key.* is missing"):
        _configure(cluster, answers)
    assert (cluster / "cluster.toml").read_text() == before
    assert not (cluster / "nodes" / "gamma").exists()


def test_removing_a_node_leaves_its_directory_alone(tmp_path: Path, cluster: Path) -> None:
    _configure(
        cluster,
        {
            "nodes": [
                {"name": "alpha"},
                {"name": "beta"},
                {"name": "gamma", "addresses": ["10.0.0.3"]},
            ]
        },
    )
    gamma_before = (cluster / "nodes" / "gamma" / "cluster.toml").read_text()
    target = resolve_target(cluster, None)
    draft = merge_answers(
        read_draft(target), {"nodes": [{"name": "alpha"}, {"name": "beta"}]}, source="a", new=False
    )
    plan = make_plan(target, draft)
    assert plan.removed == ["gamma"]
    apply_plan(plan)
    assert (cluster / "nodes" / "gamma" / "cluster.toml").read_text() == gamma_before
    assert [n.name for n in load(cluster / "nodes" / "beta").cluster.nodes] == ["alpha", "beta"]


def test_a_node_directory_cannot_remove_its_own_node(cluster: Path) -> None:
    node_dir = cluster / "nodes" / "beta"
    target = resolve_target(None, node_dir)
    answers = {
        "cluster": {"active": "alpha"},
        "nodes": [{"name": "alpha"}, {"name": "delta", "addresses": ["10.0.0.4"]}],
    }
    draft = merge_answers(read_draft(target), answers, source="a", new=False)
    with pytest.raises(UsageError, match="node 'beta', which this change removes"):
        make_plan(target, draft)


def test_targets(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UsageError, match="not empty"):
        resolve_target(tmp_path / "full", None)
    with pytest.raises(UsageError, match="not both"):
        resolve_target(tmp_path / "a", tmp_path / "b")
    with pytest.raises(UsageError, match="--out DIR to create"):
        resolve_target(None, tmp_path)
    assert not resolve_target(tmp_path / "new", None).existing


def test_sync_keeps_the_text_when_nothing_changes(cluster: Path) -> None:
    text = (cluster / "cluster.toml").read_text()
    doc = tomlkit.parse(text)
    sync_document(doc, tomllib.loads(text))
    assert tomlkit.dumps(doc) == text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "stead.cli.configure", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_cli_bad_answers_exit_10_with_every_problem(tmp_path: Path) -> None:
    answers = tmp_path / "bad.json"
    answers.write_text(json.dumps(_with("nodes.1.addresses", ["nope"]) | {"extra": 1}))
    result = _cli("--out", str(tmp_path / "c"), "--answers", str(answers))
    assert result.returncode == 10
    assert "nodes.1.addresses (beta): 'nope' is not an IP address" in result.stderr
    assert "extra: unknown key" in result.stderr
    assert "nothing written" in result.stderr
    assert not (tmp_path / "c").exists()


def test_cli_edit_needs_yes_without_a_terminal(cluster: Path, tmp_path: Path) -> None:
    answers = tmp_path / "edit.toml"
    answers.write_text("[failover]\nautomatic = false\n")
    before = (cluster / "cluster.toml").read_text()
    refused = _cli("--config-dir", str(cluster), "--answers", str(answers))
    assert refused.returncode == 11
    assert "-automatic = true" in refused.stdout and "+automatic = false" in refused.stdout
    assert "--yes" in refused.stderr
    assert (cluster / "cluster.toml").read_text() == before
    done = _cli("--config-dir", str(cluster), "--answers", str(answers), "--yes")
    assert done.returncode == 0, done.stderr
    assert load(cluster / "nodes" / "alpha").cluster.failover.automatic is False


def test_cli_interactive_needs_a_terminal(tmp_path: Path) -> None:
    result = _cli("--out", str(tmp_path / "c"))
    assert result.returncode == 11
    assert "--answers FILE" in result.stderr


def test_sync_matches_entries_by_name_and_writes_in_init_style() -> None:
    text = (
        '[public]  # who clients see\nhostname = ""\n\n'
        '[[nodes]]\nname = "a"\npriority = 100   # lower first\n\n'
        '[[nodes]]\nname = "b"\npriority = 110   # lower first\n\n'
        '[[nodes]]\nname = "c"\npriority = 120   # c comes last\n'
    )
    data = tomllib.loads(text)
    data["public"]["dns"] = {"zone": "example.com"}
    data["public"]["addresses"] = [{"address": "198.51.100.10/24", "interface": "eth0"}]
    data["nodes"].pop(1)
    data["nodes"][0]["priority"] = 5
    data["nodes"][0]["management"] = {"hostname": "a"}
    data["nodes"].append({"name": "d", "priority": 130})
    data["services"] = [{"name": "web", "unit": "x.service", "checks": [{"kind": "systemd"}]}]
    doc = tomlkit.parse(text)
    sync_document(doc, data)
    result = tomlkit.dumps(doc)
    assert tomllib.loads(result) == data
    assert "priority = 5     # lower first" in result  # the comment keeps its column
    assert "priority = 120   # c comes last" in result  # c was not rewritten as b
    assert 'addresses = [{address = "198.51.100.10/24", interface = "eth0"}]' in result
    assert '\n[public.dns]\nzone = "example.com"\n\n[[nodes]]' in result
    assert 'management = {hostname = "a"}' in result
    assert '# c comes last\n\n[[nodes]]\nname = "d"' in result
    assert '\n\n[[services]]\nname = "web"' in result
    assert "\n[[services.checks]]\nkind = " in result
