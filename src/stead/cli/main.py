"""The ``stead`` command: one Typer app, one module per command group.

A command's module is imported only when that command runs: ``stead status`` does not load
the lab, the wizard or the patch runner (the whole CLI took about 1 s to import, most of
it in modules that one command never uses). ``stead`` alone, ``--help`` or an unknown name
builds the whole app, so that help and the "no such command" error list every command.
"""

from __future__ import annotations

import importlib
import sys

import typer

from stead.errors import SteadError

HELP = "Stead: keep exact clones of a Linux server in sync and fail over in seconds."

# name: (module under stead.cli, attribute, whether it is a group of subcommands); in the
# order ``stead --help`` lists them.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "init": ("init", "init", False),
    "configure": ("configure", "configure", False),
    "config": ("config", "app", True),
    "agent": ("agent", "agent", False),
    "status": ("status", "status", False),
    "wait-sync": ("status", "wait_sync", False),
    "check": ("check", "check", False),
    "filters": ("filters", "filters", False),
    "inventory": ("inventory", "inventory", False),
    "drift": ("drift", "drift", False),
    "patch": ("patch", "patch", False),
    "reclone": ("reclone", "app", True),
    "schedule": ("schedule", "app", True),
    "switchover": ("roles", "switchover", False),
    "failover": ("roles", "failover", False),
    "maintenance": ("roles", "maintenance", False),
    "quarantine": ("roles", "quarantine_app", True),
    "lab": ("lab", "app", True),
}


def build_app(command: str | None = None) -> typer.Typer:
    """The app with every command, or with just ``command`` when that names one."""
    app = typer.Typer(
        name="stead",
        help=HELP,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def _root() -> None:
        """Keeps ``stead NAME`` a group even when one command is loaded."""

    names = [command] if command in COMMANDS else list(COMMANDS)
    for name in names:
        module, attribute, group = COMMANDS[name]
        target = getattr(importlib.import_module(f"stead.cli.{module}"), attribute)
        if group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        build_app(command)()
    except SteadError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
