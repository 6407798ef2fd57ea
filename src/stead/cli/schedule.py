"""``stead schedule``: add, list, remove, enable and disable reclone schedules.

The schedule is checked here first (cron or recurrence rule, time zone, node names against
the cluster configuration when it can be read), so that a mistake is named before any agent
is asked; the agent checks again when it adds the schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, JsonOption, SocketOption
from stead.config.load import load_cluster
from stead.config.paths import CLUSTER_FILE, config_dir
from stead.errors import ConfigError, UsageError
from stead.reclone.schedule import Schedule, parse_schedule, zone_of

app = typer.Typer(help="Reclone passives on a schedule.", no_args_is_help=True)

MISSED_POLICIES = ("run-once", "skip")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90m``, ``24h``, ``2d`` or ``3600s`` (a bare number is hours) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise UsageError(f"{text!r} is not a duration such as 90m, 24h or 2d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2] or "h"])


def local_zone() -> str:
    """This machine's IANA time zone name: $TZ, /etc/timezone, /etc/localtime, else UTC."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    try:
        target = str(Path("/etc/localtime").resolve())
        if "/zoneinfo/" in target:
            candidates.append(target.split("/zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                zone_of(name)
            except ValueError:
                continue
            return name
    return "UTC"


def cluster_nodes(directory: Path | None) -> list[str] | None:
    """The cluster's node names, or None when no cluster file can be read here."""
    path = config_dir(directory) / CLUSTER_FILE
    if directory is None and not path.is_file():
        from stead.lab.state import find_lab

        lab = find_lab()
        if lab is None:
            return None
        path = lab.paths(lab.nodes[0]).etc / CLUSTER_FILE
    if not path.is_file():
        return None
    try:
        return [node.name for node in load_cluster(path).nodes]
    except ConfigError:
        return None


def build_request(
    name: str,
    *,
    cron: str | None,
    rrule: str | None,
    offset_days: int,
    timezone: str,
    nodes: list[str],
    all_nodes: bool,
    delete_original: bool,
    missed: str,
    grace: str | None,
    known_nodes: list[str] | None,
) -> dict[str, Any]:
    """The POST body for a new schedule, checked as far as it can be without the agent."""
    if (cron is None) == (rrule is None):
        raise UsageError("give exactly one of --cron EXPR and --rrule RULE")
    if offset_days and rrule is None:
        raise UsageError("--offset-days goes with --rrule")
    if bool(nodes) == all_nodes:
        raise UsageError("give the nodes to reclone with --node NAME (repeatable) or --all")
    if missed not in MISSED_POLICIES:
        raise UsageError(f"--missed must be one of {', '.join(MISSED_POLICIES)}, not {missed!r}")
    body: dict[str, Any] = {
        "name": name,
        "timezone": timezone,
        "delete_original": delete_original,
        "missed": missed,
    }
    if cron is not None:
        body["cron"] = cron
    else:
        body["rrule"] = rrule
        body["offset_days"] = offset_days
    if all_nodes:
        body["all"] = True
    else:
        body["nodes"] = nodes
    if grace is not None:
        body["grace"] = parse_duration(grace).total_seconds()
    schedule = parse_schedule({**body, "created": datetime.now(UTC).isoformat()})
    if known_nodes is not None:
        unknown = [node for node in schedule.nodes if node not in known_nodes]
        if unknown:
            raise UsageError(
                f"unknown node(s) {', '.join(unknown)}; the cluster has {', '.join(known_nodes)}"
            )
    return body


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A short name for the schedule.")],
    cron: Annotated[
        str | None, typer.Option("--cron", help="Five-field cron expression, e.g. '0 3 * * 0'.")
    ] = None,
    rrule: Annotated[
        str | None,
        typer.Option(
            "--rrule", help="RFC 5545 rule, e.g. 'FREQ=MONTHLY;BYDAY=+2TU;BYHOUR=3;BYMINUTE=0'."
        ),
    ] = None,
    offset_days: Annotated[
        int,
        typer.Option("--offset-days", help="Move each --rrule date by N days (1: the day after)."),
    ] = 0,
    tz: Annotated[
        str | None, typer.Option("--tz", help="IANA time zone (default: this machine's).")
    ] = None,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="A node to reclone (repeatable).")
    ] = None,
    all_nodes: Annotated[bool, typer.Option("--all", help="Reclone every passive.")] = False,
    delete_original: Annotated[
        bool, typer.Option("--delete-original", help="Delete the original after the swap.")
    ] = False,
    missed: Annotated[
        str,
        typer.Option("--missed", help="Runs missed while the agent was down: run-once or skip."),
    ] = "run-once",
    grace: Annotated[
        str | None,
        typer.Option("--grace", help="run-once only within this long after (default 24h)."),
    ] = None,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Add a reclone schedule."""
    body = build_request(
        name,
        cron=cron,
        rrule=rrule,
        offset_days=offset_days,
        timezone=tz or local_zone(),
        nodes=list(node or []),
        all_nodes=all_nodes,
        delete_original=delete_original,
        missed=missed,
        grace=grace,
        known_nodes=cluster_nodes(config),
    )
    added = AgentClient(find_socket(socket, config)).call("POST", "/v1/schedules", body)
    schedule = Schedule.model_validate(added)
    print(
        f"schedule {schedule.name} added: {schedule.describe()} ({schedule.timezone}),"
        f" reclones {schedule.targets()}"
    )


def _when(instant: str, zone: str) -> str:
    moment = datetime.fromisoformat(instant)
    local = moment.astimezone(zone_of(zone)).strftime("%Y-%m-%d %H:%M %Z")
    return f"{local} ({moment.astimezone(UTC).strftime('%H:%M UTC')})"


def render(listed: list[dict[str, Any]]) -> Table:
    table = Table(title="reclone schedules", title_justify="left")
    for column in ("name", "rule", "zone", "nodes", "on", "next runs", "last run"):
        table.add_column(column)
    for item in listed:
        last = item.get("last_run") or {}
        options = ["delete original"] if item.get("delete_original") else []
        options.append(f"missed: {item.get('missed')}")
        state = "[green]enabled[/green]" if item.get("enabled") else "[red]disabled[/red]"
        if item.get("running"):
            state += " [cyan]running[/cyan]"
        table.add_row(
            item["name"],
            str(item.get("rule", "")),
            item["timezone"],
            "all passives" if item.get("all") else ", ".join(item.get("nodes", [])),
            "\n".join([state, *options]),
            "\n".join(_when(instant, item["timezone"]) for instant in item["next_runs"]) or "-",
            f"{last['outcome']} {last.get('instant') or ''}".strip() if last else "-",
        )
    return table


@app.command("list")
def list_schedules(
    as_json: JsonOption = False,
    count: Annotated[int, typer.Option("--count", min=0, max=50, help="Next runs to show.")] = 3,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """List the schedules with their next runs, in each schedule's zone and in UTC."""
    data = AgentClient(find_socket(socket, config)).call("GET", f"/v1/schedules?count={count}")
    if as_json:
        print(json.dumps(data, indent=2))
        return
    Console().print(render(data.get("schedules", [])))


@app.command("remove")
def remove(name: str, config: ConfigDirOption = None, socket: SocketOption = None) -> None:
    """Remove a schedule (a run in progress goes on)."""
    AgentClient(find_socket(socket, config)).call("DELETE", f"/v1/schedules/{quote(name, safe='')}")
    print(f"schedule {name} removed")


def _toggle(name: str, action: str, config: Path | None, socket: Path | None) -> None:
    AgentClient(find_socket(socket, config)).call(
        "POST", f"/v1/schedules/{quote(name, safe='')}/{action}"
    )
    print(f"schedule {name} {action}d")


@app.command("enable")
def enable(name: str, config: ConfigDirOption = None, socket: SocketOption = None) -> None:
    """Enable a schedule; fire times that passed while it was disabled are not run."""
    _toggle(name, "enable", config, socket)


@app.command("disable")
def disable(name: str, config: ConfigDirOption = None, socket: SocketOption = None) -> None:
    """Disable a schedule without removing it."""
    _toggle(name, "disable", config, socket)
