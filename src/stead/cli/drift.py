"""``stead drift``: what differs between the active and each passive outside the protected set.

The active compares its installed packages and its system trees (``[system]``) with every
passive's and prints, per passive, ``in step`` or what differs. Exit codes: 0 every passive
compared is in step, 1 some passive drifted (a reclone is due), 3 none drifted but some
passive could not be compared (unreachable or failed).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any
from urllib.parse import urlencode

import typer
from rich.console import Console
from rich.markup import escape

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption
from stead.errors import UsageError

SHOWN = 40  # differences listed per passive and kind before "... and N more"
EXIT_DRIFTED = 1
EXIT_NOT_COMPARED = 3


def drift(
    node: Annotated[str | None, typer.Option("--node", help="Compare this passive only.")] = None,
    packages_only: Annotated[
        bool, typer.Option("--packages-only", help="Compare installed packages only.")
    ] = False,
    trees_only: Annotated[
        bool, typer.Option("--trees-only", help="Compare the system trees only.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after seconds.")] = 900.0,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Compare installed packages and system trees of the active and each passive."""
    if packages_only and trees_only:
        raise UsageError("--packages-only and --trees-only exclude each other")
    if not timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    query: dict[str, str] = {
        "trees": "false" if packages_only else "true",
        "packages": "false" if trees_only else "true",
    }
    if node:
        query["node"] = node
    client = AgentClient(find_socket(socket, config), timeout=timeout)
    result: dict[str, Any] = client.call("GET", f"/v1/drift?{urlencode(query)}")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, Console(highlight=False, soft_wrap=True))
    states = [n["state"] for n in result["nodes"].values()]
    if "drifted" in states:
        raise typer.Exit(EXIT_DRIFTED)
    if any(state not in ("in step", "drifted") for state in states):
        raise typer.Exit(EXIT_NOT_COMPARED)


def shown(path: str) -> str:
    """A path as text a terminal can show: bytes that are not UTF-8 as ``\\xNN``."""
    return escape(os.fsencode(path).decode("utf-8", "backslashreplace"))


def summary(report: dict[str, Any]) -> str:
    """One line: ``in step``, the reason it was not compared, or counts of differences."""
    state = report["state"]
    if state in ("unreachable", "failed"):
        return f"[red]{state}[/red]: {escape(report['error'])}"
    if state == "in step":
        return "[green]in step[/green]"
    counts = []
    packages = report.get("packages") or {}
    for key, words in (
        ("only_active", "package{s} only on the active"),
        ("only_passive", "package{s} only here"),
        ("version_differs", "package{s} in another version"),
    ):
        if packages.get(key):
            counts.append(_count(len(packages[key]), words))
    paths = report.get("paths") or {}
    for key, words in (
        ("only_active", "path{s} only on the active"),
        ("only_passive", "path{s} only here"),
        ("content", "path{s} with other content"),
        ("metadata", "path{s} with another mode or owner"),
        ("type", "path{s} of another type"),
    ):
        if paths.get(key):
            counts.append(_count(len(paths[key]), words))
    return f"[yellow]drifted[/yellow]: {', '.join(counts)}"


def _count(n: int, words: str) -> str:
    return f"{n} {words.format(s='' if n == 1 else 's')}"


def _lines(report: dict[str, Any], name: str) -> list[tuple[str, list[str]]]:
    """(heading, items) per kind of difference, each item one printable line."""
    groups: list[tuple[str, list[str]]] = []
    packages = report.get("packages") or {}
    paths = report.get("paths") or {}
    groups.append(
        (
            "packages only on the active",
            [f"{escape(n)} {escape(v)}" for n, v in packages.get("only_active", {}).items()],
        )
    )
    groups.append(
        (
            f"packages only on {name}",
            [f"{escape(n)} {escape(v)}" for n, v in packages.get("only_passive", {}).items()],
        )
    )
    groups.append(
        (
            f"package versions (active / {name})",
            [
                f"{escape(n)} {escape(a)} / {escape(p)}"
                for n, (a, p) in packages.get("version_differs", {}).items()
            ],
        )
    )
    groups.append(("paths only on the active", [shown(p) for p in paths.get("only_active", [])]))
    groups.append((f"paths only on {name}", [shown(p) for p in paths.get("only_passive", [])]))
    groups.append(("content differs", [shown(p) for p in paths.get("content", [])]))
    groups.append(
        (
            f"mode or owner differs (active / {name})",
            [
                f"{shown(d['path'])}  "
                + ", ".join(f"{k} {a} / {b}" for k, (a, b) in d["differs"].items())
                for d in paths.get("metadata", [])
            ],
        )
    )
    groups.append(
        (
            f"type differs (active / {name})",
            [f"{shown(d['path'])}  {d['active']} / {d['passive']}" for d in paths.get("type", [])],
        )
    )
    groups.append(
        (
            "not compared: unreadable",
            [
                f"{shown(d['path'])}  {escape(d['active'] or d['passive'])}"
                for d in paths.get("unreadable", [])
            ],
        )
    )
    return [(heading, items) for heading, items in groups if items]


def print_report(result: dict[str, Any], console: Console) -> None:
    parts = [w for w, on in (("packages", result["packages"]), ("trees", result["trees"])) if on]
    console.print(
        f"drift of each passive from the active [bold]{escape(result['active'])}[/bold] "
        f"({' and '.join(parts)}; manager {result['manager'] or 'none'})"
    )
    for name, report in result["nodes"].items():
        console.print(f"[bold]{escape(name)}[/bold]: {summary(report)}")
        for warning in report.get("warnings", []):
            console.print(f"  [yellow]warning:[/yellow] {escape(warning)}")
        for heading, items in _lines(report, escape(name)):
            console.print(f"  {heading}:")
            for item in items[:SHOWN]:
                console.print(f"    {item}")
            if len(items) > SHOWN:
                console.print(f"    ... and {len(items) - SHOWN} more (--json lists all)")
