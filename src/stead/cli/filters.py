"""``stead filters``: which paths are protected and which filter decided."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stead.cli.options import ConfigDirOption, JsonOption
from stead.config.load import load_cluster
from stead.config.paths import config_dir
from stead.replication.filters import Decision, Filter


def _explain(
    root: Path, rules: Filter, show_excluded: bool
) -> Iterator[tuple[str, bool, Decision]]:
    """Every path under root with the decision; excluded directories are not entered."""
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        kept = []
        for name in sorted(dirs):
            relative = name if base == "." else f"{base}/{name}"
            decision = rules.decide(relative, True)
            if decision.protected or show_excluded:
                yield relative, True, decision
            if decision.protected:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            relative = name if base == "." else f"{base}/{name}"
            decision = rules.decide(relative, False)
            if decision.protected or show_excluded:
                yield relative, False, decision


def filters(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Paths to explain (default: walk every root).")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="When walking, list excluded paths too.")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
) -> None:
    """Show which paths are protected and which include or exclude filter decided."""
    cluster = load_cluster(config_dir(config) / "cluster.toml")
    rows: list[tuple[str, bool, str]] = []
    for protected in cluster.protected:
        root = Path(protected.path)
        rules = Filter(protected.include, protected.exclude)
        if paths:
            for path in paths:
                absolute = path.absolute()
                if absolute != root and root not in absolute.parents:
                    continue
                relative = absolute.relative_to(root).as_posix()
                decision = rules.decide(relative, absolute.is_dir())
                rows.append((str(absolute), decision.protected, decision.rule))
            continue
        for relative, is_dir, decision in _explain(root, rules, show_all):
            suffix = "/" if is_dir else ""
            rows.append((f"{root}/{relative}{suffix}", decision.protected, decision.rule))
    if paths:
        explained = {row[0] for row in rows}
        for path in paths:
            if str(path.absolute()) not in explained:
                rows.append((str(path.absolute()), False, "outside every protected path"))
    if as_json:
        print(json.dumps([{"path": p, "protected": ok, "rule": r} for p, ok, r in rows], indent=2))
        return
    table = Table(title="protected paths")
    table.add_column("path")
    table.add_column("protected")
    table.add_column("decided by")
    for shown, ok, rule in rows:
        table.add_row(shown, "[green]yes[/green]" if ok else "[red]no[/red]", rule)
    Console().print(table)
