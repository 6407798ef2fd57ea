"""The ``stead`` command: one Typer app, one module per command group."""

from __future__ import annotations

import sys

import typer

from stead.cli import (
    agent,
    check,
    config,
    configure,
    drift,
    filters,
    init,
    inventory,
    lab,
    patch,
    reclone,
    roles,
    schedule,
    status,
)
from stead.errors import SteadError

app = typer.Typer(
    name="stead",
    help="Stead: keep exact clones of a Linux server in sync and fail over in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("init")(init.init)
app.command("configure")(configure.configure)
app.add_typer(config.app, name="config")
app.command("agent")(agent.agent)
app.command("status")(status.status)
app.command("wait-sync")(status.wait_sync)
app.command("check")(check.check)
app.command("filters")(filters.filters)
app.command("inventory")(inventory.inventory)
app.command("drift")(drift.drift)
app.command("patch")(patch.patch)
app.add_typer(reclone.app, name="reclone")
app.add_typer(schedule.app, name="schedule")
app.command("switchover")(roles.switchover)
app.command("failover")(roles.failover)
app.command("maintenance")(roles.maintenance)
app.add_typer(roles.quarantine_app, name="quarantine")
app.add_typer(lab.app, name="lab")


def main() -> None:
    try:
        app()
    except SteadError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
