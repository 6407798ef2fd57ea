"""CLI arguments and environments that cannot work get a clear message and an exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stead.errors import AgentUnavailable, ConfigError, SteadError, all_errors


def _stead(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stead", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "STEAD_LAB_DIR": "/nonexistent-lab", "COLUMNS": "300", **(env or {})},
    )


def test_status_without_an_agent(tmp_path: Path) -> None:
    result = _stead("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == AgentUnavailable.exit_code
    assert "stead agent" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_configuration_is_named(tmp_path: Path) -> None:
    result = _stead("status", "--config-dir", str(tmp_path))
    assert result.returncode == ConfigError.exit_code
    assert str(tmp_path / "cluster.toml") in result.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("wait-sync", "--timeout", "-1"), "must be positive"),
        (("wait-sync", "--timeout", "soon"), "valid number"),
        (("init", "--node", "a"), "--protect"),
        (("init", "--node", "primary", "--protect", "/srv"), "NAME=ADDRESS"),
        (("check", "--bogus"), "No such option"),
        (("lab", "up", "--nodes", "0"), ""),
    ],
)
def test_bad_arguments(args: tuple[str, ...], text: str) -> None:
    result = _stead(*args)
    assert result.returncode != 0
    assert text in " ".join((result.stderr + result.stdout).split())
    assert "Traceback" not in result.stderr


def test_every_error_has_its_own_exit_code_and_template() -> None:
    classes = all_errors()
    assert classes[0] is SteadError
    codes = [cls.exit_code for cls in classes]
    assert len(codes) == len(set(codes)), "exit codes must be unique"
    for cls in classes:
        assert cls.__doc__, f"{cls.__name__} needs a message template"


def test_readme_lists_every_error_and_exit_code() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for cls in all_errors():
        template = (cls.__doc__ or "").strip().splitlines()[0]
        row = f"| {cls.exit_code} | `{cls.__name__}` | {template} |"
        assert row in readme, f"README's exit-code table lacks {cls.__name__}"


def test_one_command_loads_only_its_own_modules(tmp_path: Path) -> None:
    """``stead wait-sync`` imports neither the other commands nor the configuration models
    (the whole CLI took about 1 s to import, twice what one command needs)."""
    probe = (
        "import sys\n"
        f"sys.argv = ['stead', 'wait-sync', '--socket', {str(tmp_path / 'none.sock')!r}]\n"
        "from stead.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('stead.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(done.stdout.split())
    assert "stead.cli.status" in loaded
    for heavy in ("stead.cli.lab", "stead.cli.configure", "stead.cli.patch", "stead.config.schema"):
        assert heavy not in loaded


def test_help_lists_every_command() -> None:
    from stead.cli.main import COMMANDS

    result = _stead("--help")
    assert result.returncode == 0
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert set(COMMANDS) <= listed


def test_socket_from_the_node_file_alone(tmp_path: Path) -> None:
    from stead.cli.client import node_socket

    (tmp_path / "node.toml").write_text('node = "a"\napi_socket = "run/agent.sock"\n')
    assert node_socket(tmp_path) == tmp_path / "run/agent.sock"  # no cluster.toml needed
    (tmp_path / "node.toml").write_text('node = "a"\n')
    assert node_socket(tmp_path) == Path("/run/stead/agent.sock")
    (tmp_path / "node.toml").write_text('node = "a"\napi_socket = 5\n')
    with pytest.raises(ConfigError) as caught:
        node_socket(tmp_path)  # unusable: the full load says why
    assert str(tmp_path / "cluster.toml") in str(caught.value.problems)
    assert any("api_socket" in p for p in caught.value.problems)
