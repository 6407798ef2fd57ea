"""``stead status`` and ``stead wait-sync``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def render_status(data: dict[str, Any]) -> Table:
    journal = data.get("journal") or {}
    title = (
        f"cluster {data['cluster']} · seen from {data['node']} ({data['role']}) · "
        f"epoch {data['epoch']}"
    )
    if journal:
        title += f" · journal {journal['first']}..{journal['head']} ({_size(journal['bytes'])})"
    capture = data.get("capture") or {}
    if capture.get("phase") and capture["phase"] != "running":
        title += (
            f" · capture: {capture['phase']} ({capture.get('initial_scan_entries', 0)} entries)"
        )
    table = Table(title=title, title_justify="left")
    for column in ("node", "role", "state", "journal head", "acked", "applied", "queue", "lag"):
        table.add_column(column, justify="right" if column not in ("node", "role") else "left")
    for node in data["nodes"]:
        state = node.get("state", "")
        color = {"in sync": "green", "syncing": "yellow", "active": "cyan"}.get(state, "red")
        lag = node.get("lag_seconds")
        table.add_row(
            node["name"],
            node["role"],
            f"[{color}]{state}[/{color}]",
            str(node.get("journal_head", journal.get("head", "-"))),
            str(node.get("persisted", "-")),
            str(node.get("applied", "-")),
            _size(node.get("queue_bytes")),
            "-" if lag is None else f"{lag:.3f} s",
        )
    return table


def status(
    as_json: JsonOption = False, config: ConfigDirOption = None, socket: SocketOption = None
) -> None:
    """Show every node: role, state, journal head, acknowledged and applied sequence, lag."""
    data = AgentClient(find_socket(socket, config)).call("GET", "/v1/status")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = Console()
    console.print(render_status(data))
    for line in render_roles(data):
        console.print(line, highlight=False)


def render_roles(data: dict[str, Any]) -> list[str]:
    """Public identity, heartbeats per channel, services, and the last decision."""
    roles = data.get("roles") or {}
    if not roles:
        return []
    lines = [
        f"public identity: {roles.get('public_holder') or 'nobody'}"
        + ("  [maintenance: not monitoring or acting]" if roles.get("maintenance") else "")
    ]
    for name, peer in (roles.get("membership") or {}).items():
        channels = ", ".join(
            f"{address} {age:.2f} s" for address, age in sorted(peer["channels"].items())
        )
        age = peer.get("heartbeat_age")
        lines.append(
            f"heartbeat from {name}: "
            + ("never" if age is None else f"{age:.2f} s ago")
            + (f" ({channels})" if channels else "")
        )
    for service in roles.get("services") or []:
        state = "running" if service.get("running") else "stopped"
        lines.append(f"service {service.get('name')}: {state}")
    witnesses = roles.get("witnesses") or {}
    if witnesses.get("ok") is not None:
        lines.append(f"witnesses: {'reachable' if witnesses['ok'] else 'LOST'}")
    if roles.get("decision"):
        lines.append(f"decision: {roles['decision']}")
    return lines


def wait_sync(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 60.0,
    require_all: Annotated[
        bool, typer.Option("--all", help="Every passive must be connected and in sync.")
    ] = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Wait until every connected passive has applied every change made before this call."""
    if timeout <= 0:
        raise typer.BadParameter("must be positive", param_hint="--timeout")
    client = AgentClient(find_socket(socket, config), timeout=timeout + 10)
    result = client.call("POST", "/v1/wait-sync", {"timeout": timeout, "all": require_all})
    console = Console()
    synced = {n: a for n, a in result["nodes"].items() if a != "disconnected"}
    nodes = ", ".join(f"{name} {applied}" for name, applied in synced.items())
    console.print(f"[green]in sync[/green] at journal head {result['head']}: {nodes or 'none'}")
    for name, applied in result["nodes"].items():
        if applied == "disconnected":
            console.print(f"[yellow]not counted: {name} is disconnected[/yellow]")
