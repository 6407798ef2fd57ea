"""Configuration: init writes what check accepts; every error names file, key and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stead.config.init import create_cluster, parse_node_spec
from stead.config.load import load
from stead.config.schema import parse_size
from stead.errors import ConfigError, UsageError


def _cluster(tmp_path: Path) -> Path:
    nodes = [parse_node_spec("primary=198.18.0.11"), parse_node_spec("secondary=198.18.0.12")]
    return create_cluster(
        tmp_path / "c", cluster_name="t", nodes=nodes, active=None, protect=["/srv/data"]
    )


def _stead(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stead", *args], capture_output=True, text=True, check=False
    )


def test_init_writes_a_valid_cluster(tmp_path: Path) -> None:
    out = _cluster(tmp_path)
    loaded = load(out / "nodes" / "secondary")
    assert loaded.name == "secondary"
    assert loaded.cluster.cluster.active == "primary"
    assert [n.name for n in loaded.cluster.nodes] == ["primary", "secondary"]
    assert (out / "nodes" / "primary" / "node.key").stat().st_mode & 0o077 == 0
    assert "# " in (out / "cluster.toml").read_text()  # commented for humans


def test_init_cli_and_config_check_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = _stead(
        "init",
        "--out",
        str(out),
        "--node",
        "a=198.18.0.11",
        "--node",
        "b=198.18.0.12",
        "--protect",
        "/srv/x",
    )
    assert result.returncode == 0, result.stderr
    ok = _stead("config", "check", "--config-dir", str(out / "nodes" / "a"))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout


def test_init_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        parse_node_spec("primary")
    with pytest.raises(UsageError):
        parse_node_spec("Bad_Name=1.2.3.4")
    with pytest.raises(UsageError, match="two"):
        create_cluster(
            tmp_path / "x",
            cluster_name="t",
            nodes=[parse_node_spec("a=198.18.0.1")],
            active=None,
            protect=["/srv"],
        )
    _cluster(tmp_path)
    with pytest.raises(UsageError, match="not empty"):
        _cluster(tmp_path)


@pytest.mark.parametrize(
    ("edit", "key", "reason"),
    [
        (("heartbeat = 0.5", "heartbeat = 4.0"), "channel", "at least 3 heartbeats"),
        (("timeout = 2.0", "timeout = 1.0"), "(top level)", "at least 4 heartbeats"),
        (("witnesses = []", 'witnesses = ["gw:80"]'), "failover.witnesses", "not an IP"),
        (("automatic_failover = true", "automatic_failover = 3"), "nodes.0", "boolean"),
        (("port = 7400", "port = 70000"), "channel.port", "less than or equal"),
        (('fsync = "batch"', 'fsync = "sometimes"'), "replication.fsync", "always"),
        (('block_size = "64KiB"', 'block_size = "3000"'), "replication.block_size", "power"),
        (('journal_max = "10GiB"', 'journal_max = "lots"'), "replication.journal_max", "size"),
        (("[channel]", "[channel]\nhartbeat = 2"), "channel.hartbeat", "unknown key"),
        (('active = "primary"', 'active = "nobody"'), "(top level)", "nobody"),
        (('path = "/srv/data"', 'path = "relative"'), "protected.0.path", "absolute"),
        (('"198.18.0.12"', '"not-an-ip"'), "nodes.1.addresses", "not an IP"),
        (('"/opt", "/usr/local"]', '"/opt", "/opt/x"]'), "system.trees", "overlap"),
        (('trees = ["/etc"', 'trees = ["etc"'), "system.trees", "absolute"),
        (('trees = ["/etc"', 'trees = ["/srv/data/sub"'), "(top level)", "lies in protected"),
        (('packages = "auto"', 'packages = "yum"'), "system.packages", "dpkg"),
        (("[system]", '[system]\nexclude = ["etc/x"]'), "system.exclude", "absolute"),
        (('"root@{host}"]', '"root@somewhere"]'), "patch.connect", "{host}"),
    ],
)
def test_config_errors_name_file_key_and_reason(
    tmp_path: Path, edit: tuple[str, str], key: str, reason: str
) -> None:
    node_dir = _cluster(tmp_path) / "nodes" / "primary"
    path = node_dir / "cluster.toml"
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as caught:
        load(node_dir)
    problem = "\n".join(caught.value.problems)
    assert str(path) in problem
    assert key in problem
    assert reason in problem
    result = _stead("config", "check", "--config-dir", str(node_dir))
    assert result.returncode == ConfigError.exit_code
    assert reason in result.stderr.replace("\n", "")


def test_toml_syntax_error_and_missing_files(tmp_path: Path) -> None:
    node_dir = _cluster(tmp_path) / "nodes" / "primary"
    (node_dir / "cluster.toml").write_text("[cluster\nname=")
    (node_dir / "node.pem").unlink()
    with pytest.raises(ConfigError) as caught:
        load(node_dir)
    problems = "\n".join(caught.value.problems)
    assert "not valid TOML" in problems
    assert "cert" in problems
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nowhere")


def test_node_not_in_cluster(tmp_path: Path) -> None:
    node_dir = _cluster(tmp_path) / "nodes" / "primary"
    node_file = node_dir / "node.toml"
    node_file.write_text(node_file.read_text().replace('node = "primary"', 'node = "ghost"'))
    with pytest.raises(ConfigError, match="ghost"):
        load(node_dir)


def test_parse_size() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("10 GiB") == 10 * 1024**3
    assert parse_size(4096) == 4096
    assert parse_size("1.5K") == 1500
    for bad in ("ten", "-1", -5, True, "5 parsecs"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_max_frame_must_hold_a_batch(tmp_path: Path) -> None:
    node_dir = _cluster(tmp_path) / "nodes" / "primary"
    path = node_dir / "cluster.toml"
    path.write_text(path.read_text().replace('max_frame = "64MiB"', 'max_frame = "2MiB"'))
    with pytest.raises(ConfigError, match="max_frame"):
        load(node_dir)
