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
