"""``stead reclone``: rebuild passives from the active; roll back; the history of runs.

``stead reclone NODE... | --all`` runs on the active (on the host of a lab, the lab's
active). The first argument names a subcommand only when it is ``rollback`` or ``history``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption
from stead.errors import RecloneError

PROGRESS_SECONDS = 0.3  # a job question returns at its end or after this
SUBCOMMANDS = ("run", "rollback", "history")


class _DefaultRun(TyperGroup):
    """``stead reclone NODE...`` means ``stead reclone run NODE...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        elif not args:
            args = ["run"]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help="Rebuild passives from the active, keeping each node's own configuration.",
)


@app.command("run")
def run(
    nodes: Annotated[list[str] | None, typer.Argument(help="Passives to reclone.")] = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="Every passive, one at a time.")] = (
        False
    ),
    delete_original: Annotated[
        bool, typer.Option("--delete-original", help="Keep no rollback generation.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only; change nothing.")] = (
        False
    ),
    force: Annotated[
        bool, typer.Option("--force", help="Even if no other passive stays in sync.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up waiting after.")] = 86400.0,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Reclone passives: their system trees become the active's, their own config stays."""
    client = AgentClient(find_socket(socket, config))
    body = {
        "nodes": nodes or [],
        "all": all_nodes,
        "delete_original": delete_original,
        "dry_run": dry_run,
        "force": force,
    }
    job = client.call("POST", "/v1/reclone", body)
    job = _follow(client, job, timeout, show=not as_json)
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        _print_report(job)
    if job["state"] != "done":
        print(f"stead: reclone failed: {job['error']}", file=sys.stderr)
        raise typer.Exit(RecloneError.exit_code)


def _follow(client: AgentClient, job: dict[str, Any], timeout: float, show: bool) -> Any:
    console = Console(stderr=True)
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[files]} files"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not (show and console.is_terminal),
    ) as progress:
        bar = progress.add_task("starting", total=None, files="", rate="")
        while job["state"] == "running":
            if time.monotonic() > deadline:
                console.print("[red]reclone still running; giving up waiting[/red]")
                raise typer.Exit(51)
            job = client.call("GET", f"/v1/jobs/{job['id']}?wait={PROGRESS_SECONDS}")
            info: dict[str, Any] = job.get("progress", {})
            moved: dict[str, Any] = info.get("progress") or {}
            progress.update(
                bar,
                description=f"{info.get('node', '')}: {info.get('phase', '')}",
                completed=moved.get("bytes_done", 0),
                total=moved.get("bytes_total") or None,
                files=f"{moved.get('files_done', 0)}/{moved.get('files_total', 0)}",
                rate=f"{moved.get('rate', 0) / 1e6:.1f} MB/s",
            )
    return job


def _print_report(job: dict[str, Any]) -> None:
    console = Console()
    dry = job["params"].get("dry_run")
    for name, result in job.get("result", {}).items():
        summary = result.get("summary") or {}
        status = result.get("status") or {}
        if status.get("provider") == "libvirt" or "steps" in status:
            _print_machine(console, name, status, dry)
            continue
        verb = "would change" if dry else "recloned"
        console.print(
            f"[bold]{name}[/bold] {verb}: {summary.get('fetch_files', 0)} files to copy "
            f"({summary.get('fetch_bytes', 0)} bytes), {summary.get('create', 0)} created, "
            f"{summary.get('replace', 0)} replaced, {summary.get('delete', 0)} deleted, "
            f"{summary.get('meta', 0)} metadata only"
            + ("" if dry else f"; {result.get('duration', 0):.1f} s, protected set checked")
        )
        for line in (result.get("status") or {}).get("skipped", [])[:20]:
            console.print(f"  [yellow]skipped[/yellow] {line}", highlight=False)


def _print_machine(console: Console, name: str, status: dict[str, Any], dry: bool) -> None:
    """A virtual machine clone (the libvirt provider): its steps or its outcome."""
    if dry:
        console.print(f"[bold]{name}[/bold] would be recloned by its machine:")
        for step in status.get("steps", []):
            console.print(f"  {step}", highlight=False)
        return
    generation = status.get("generation") or {}
    kept = (
        "original deleted"
        if generation.get("deleted")
        else f"original kept as {generation.get('detail', '-')}"
    )
    console.print(
        f"[bold]{name}[/bold] recloned: machine {status.get('summary', {}).get('domain', '')} "
        f"defined from the active's, {kept}; protected set checked",
        highlight=False,
    )


@app.command("rollback")
def rollback(
    node: Annotated[str, typer.Argument(help="The passive whose last reclone to undo.")],
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Put back the system trees a node had before its last reclone."""
    client = AgentClient(find_socket(socket, config))
    answer = client.call("POST", "/v1/reclone/rollback", {"node": node}, timeout=330)
    print(f"{node}: reclone {answer['run']} rolled back ({answer['operations']} operations)")


@app.command("history")
def history(
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Every reclone run: when, what triggered it, node, bytes, duration, result."""
    runs = AgentClient(find_socket(socket, config)).call("GET", "/v1/reclone/history")
    if as_json:
        print(json.dumps(runs, indent=2))
        return
    table = Table("run", "started (UTC)", "trigger", "node", "files", "bytes", "seconds", "result")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.get("started", 0)))
        result = run.get("result", "")
        if run.get("error"):
            result += f": {run['error']}"
        table.add_row(
            run.get("run", ""),
            started,
            run.get("trigger", ""),
            run.get("node", ""),
            str(run.get("files", 0)),
            str(run.get("bytes", 0)),
            str(run.get("duration", "")),
            result,
        )
    Console().print(table)
