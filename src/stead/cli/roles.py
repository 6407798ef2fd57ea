"""``stead switchover``, ``stead failover``, ``stead maintenance``, ``stead quarantine``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption
from stead.errors import UsageError

PROGRESS_SECONDS = 0.1  # a job question returns at its end or after this


def switchover(
    to: Annotated[
        str | None, typer.Option("--to", help="The passive to take over (default: the best).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after seconds.")] = 600.0,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Planned role change with no data loss; prints each step and its duration."""
    client = AgentClient(find_socket(socket, config))
    job = client.call("POST", "/v1/switchover", {"to": to})
    console = Console()
    if not as_json:
        console.print(f"switchover to [bold]{job['params']['to']}[/bold]")
    deadline = time.monotonic() + timeout
    shown = 0
    started = time.monotonic()
    while True:
        steps = job.get("result", {}).get("steps", [])
        for item in steps[shown:]:
            if item["state"] == "running":
                break
            if not as_json:
                console.print(f"  {item['step']:<18} {item['state']:<7} {item['seconds']:7.3f} s")
            shown += 1
        if job["state"] != "running":
            break
        if time.monotonic() > deadline:
            console.print("[red]switchover still running; giving up waiting[/red]")
            raise typer.Exit(51)
        try:
            job = client.call("GET", f"/v1/jobs/{job['id']}?wait={PROGRESS_SECONDS}")
        except Exception:  # the old active's API may be busy changing role: ask again
            if time.monotonic() > deadline:
                raise
            time.sleep(PROGRESS_SECONDS)  # it cannot be asked now: nothing to await
    if as_json:
        print(json.dumps(job, indent=2))
    elif job["state"] == "done":
        console.print(
            f"[green]{job['params']['to']} is active[/green] (epoch {job['result'].get('epoch')})"
            f" after {time.monotonic() - started:.2f} s"
        )
    if job["state"] != "done":
        print(f"stead: switchover failed: {job['error']}", file=sys.stderr)
        raise typer.Exit(2)


def _socket_of(node: str, socket: Path | None, config: Path | None) -> Path:
    if socket is None and config is None:
        from stead.lab.state import find_lab

        lab = find_lab()
        if lab is not None:
            return lab.socket_path(node)
    return find_socket(socket, config)


def failover(
    to: Annotated[str, typer.Option("--to", help="The passive to make active now.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Force NODE to take over while the active is unheard (may lose the journal tail)."""
    client = AgentClient(_socket_of(to, socket, config), timeout=180.0)
    status = client.call("GET", "/v1/status")
    if status["node"] != to:
        raise UsageError(f"this agent is {status['node']}; run `stead failover` on {to}")
    me = status["nodes"][0]
    console = Console(stderr=True)
    console.print(
        f"[yellow]warning:[/yellow] {to} takes over at position {me.get('applied')}; whatever "
        "the old active journaled beyond that and did not send is lost here (it is kept in "
        "the old active's quarantine when it returns)."
    )
    if not yes and not typer.confirm("Fail over now?", err=True):
        raise typer.Exit(1)
    result = client.call("POST", "/v1/failover", {})
    if as_json:
        print(json.dumps(result, indent=2))
        return
    Console().print(
        f"[green]{to} is active[/green] in epoch {result['epoch']} at {result['applied']}; "
        f"records possibly lost: {result['possibly_lost_records']}"
    )


def maintenance(
    mode: Annotated[str, typer.Argument(help="on or off")],
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Stop (on) or resume (off) monitoring and acting; replication goes on."""
    if mode not in ("on", "off"):
        raise UsageError("say `stead maintenance on` or `stead maintenance off`")
    sockets = [find_socket(socket, config)]
    if socket is None and config is None:
        from stead.lab.state import find_lab

        lab = find_lab()
        if lab is not None:
            sockets = [lab.socket_path(name) for name in lab.nodes]
    for path in sockets:
        AgentClient(path).call("POST", "/v1/maintenance", {"on": mode == "on"})
    print(f"maintenance {mode} on {len(sockets)} node(s)")


quarantine_app = typer.Typer(help="Files a returning former active wrote after a failover.")


@quarantine_app.command("list")
def quarantine_list(
    node: Annotated[str | None, typer.Option("--node", help="Only this node.")] = None,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """List every quarantine generation and the files kept in it."""
    answers: list[dict[str, Any]] = []
    from stead.lab.state import find_lab

    lab = find_lab() if socket is None and config is None else None
    if lab is not None:
        names = [node] if node else lab.nodes
        sockets = [lab.socket_path(name) for name in names]
    else:
        sockets = [find_socket(socket, config)]
    for path in sockets:
        answers.append(AgentClient(path).call("GET", "/v1/quarantine"))
    if as_json:
        print(json.dumps(answers, indent=2))
        return
    console = Console()
    empty = True
    for answer in answers:
        for generation in answer["generations"]:
            empty = False
            console.print(
                f"[bold]{answer['node']}[/bold] {generation['generation']} ({generation['path']})"
            )
            for item in generation["files"]:
                console.print(
                    f"  {item['root']}/{item['path']}  {item['size']} bytes  {item['why']}",
                    highlight=False,
                )
    if empty:
        console.print("no quarantined files")
