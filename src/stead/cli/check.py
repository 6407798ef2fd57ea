"""``stead check``: full system check (block checksums) or fast check, with repair."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption

PROGRESS_SECONDS = 0.2  # a job question returns at its end or after this


def check(
    fast: Annotated[bool, typer.Option("--fast", help="Compare size, mtime and mode only.")] = (
        False
    ),
    node: Annotated[str | None, typer.Option("--node", help="Check this passive only.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after seconds.")] = 3600.0,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Compare the passives with the active, repair every difference through the journal."""
    client = AgentClient(find_socket(socket, config))
    job = client.call("POST", "/v1/check", {"node": node, "fast": fast})
    deadline = time.monotonic() + timeout
    console = Console(stderr=True)
    show = console.is_terminal and not as_json
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} files"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
    ) as progress:
        bar = progress.add_task("checking", total=None)
        while job["state"] == "running":
            if time.monotonic() > deadline:
                console.print("[red]check still running; giving up waiting[/red]")
                raise typer.Exit(51)
            job = client.call("GET", f"/v1/jobs/{job['id']}?wait={PROGRESS_SECONDS}")
            info: dict[str, Any] = job.get("progress", {})
            progress.update(
                bar,
                description=f"checking {info.get('node', '')}",
                completed=info.get("compared", 0),
                total=info.get("total") or None,
            )
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        _print_report(job)
    if job["state"] != "done":
        print(f"stead: check failed: {job['error']}", file=sys.stderr)
        raise typer.Exit(2)
    if any(report["differences"] for report in job["result"].values()):
        raise typer.Exit(1)


def _print_report(job: dict[str, Any]) -> None:
    console = Console()
    kind = "fast" if job["params"]["fast"] else "full"
    for name in job["params"].get("skipped", []):
        console.print(f"[yellow]{name} is not connected: not checked[/yellow]")
    for name, report in job["result"].items():
        diffs = report["differences"]
        console.print(
            f"{kind} check of [bold]{name}[/bold]: {report['compared']} paths compared, "
            f"{len(diffs)} differences, {report['repair_entries']} repair entries journaled"
        )
        for diff in diffs[:200]:
            console.print(f"  {diff['what']:<10} {diff['root']}/{diff['path']}", highlight=False)
        if len(diffs) > 200:
            console.print(f"  ... and {len(diffs) - 200} more")
