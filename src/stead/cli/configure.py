"""``stead configure``: the configuration wizard, interactive or from an answers file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from stead.cli.options import ConfigDirOption
from stead.config.wizard import (
    Plan,
    apply_plan,
    make_plan,
    merge_answers,
    new_draft,
    read_answers,
    read_draft,
    resolve_target,
)
from stead.config.wizard_ask import Asker, Prompt, as_bool
from stead.config.wizard_flow import Wizard
from stead.errors import ConfigError, SteadError, UsageError

_console = Console(soft_wrap=True)
_errors = Console(stderr=True, soft_wrap=True)


def configure(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Directory of a new cluster (or of one `stead init` wrote)."
        ),
    ] = None,
    config: ConfigDirOption = None,
    answers: Annotated[
        Path | None,
        typer.Option(
            "--answers", "-a", help="Answers file (TOML, or JSON if it ends in .json): no prompts."
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Write without asking.")] = False,
) -> None:
    """Create or change a cluster's configuration; nothing is written until all is valid."""
    try:
        _configure(out, config, answers, yes)
    except ConfigError as exc:
        for problem in exc.problems:
            _errors.print(Text.assemble(("error ", "red"), problem))
        _errors.print("nothing written")
        raise typer.Exit(ConfigError.exit_code) from None
    except (KeyboardInterrupt, EOFError):
        _errors.print("\ncancelled: nothing written")
        raise typer.Exit(1) from None


def _configure(out: Path | None, config: Path | None, answers: Path | None, yes: bool) -> None:
    target = resolve_target(out, config)
    draft = read_draft(target) if target.existing else new_draft()
    asker: Asker | None = None
    if answers is not None:
        given = read_answers(answers)
        draft = merge_answers(draft, given, source=str(answers), new=not target.existing)
        source = str(answers)
    else:
        asker = _terminal_asker()
        if asker is None:
            raise UsageError(
                "stead configure asks its questions on a terminal: run it on one, "
                "or give --answers FILE"
            )
        draft = Wizard(
            asker, draft, new=not target.existing, cannot_add_nodes=target.cannot_add_nodes()
        ).run()
        source = "the answers"
    plan = make_plan(target, draft, source=source)
    if target.existing and not plan.changed:
        _console.print(f"no change to {target.cluster_file}: nothing written")
        return
    _show(plan)
    if not yes and (target.existing or answers is None):
        asker = asker or _terminal_asker()
        if asker is None:
            raise UsageError("no terminal to confirm on: add --yes to write without asking")
        question = "Write these changes?" if target.existing else "Create this cluster?"
        reply = asker.ask(
            Prompt(f"{question} [Y/n]", hint="yes"),
            lambda text: None if _is_yes_no(text) else "answer yes or no",
        )
        if not as_bool(reply or "yes"):
            _errors.print("nothing written")
            raise typer.Exit(1)
    written = apply_plan(plan)
    _report(plan, written)


def _is_yes_no(text: str) -> bool:
    try:
        as_bool(text or "yes")
    except ValueError:
        return False
    return True


def _terminal_asker() -> Asker | None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    from stead.config.wizard_tui import TerminalAsker  # prompt_toolkit only when asked

    return TerminalAsker()


def _show(plan: Plan) -> None:
    if not plan.target.existing:
        config = plan.config
        _console.print(
            f"new cluster {config.cluster.name!r} in {plan.target.directory}: nodes "
            f"{', '.join(n.name for n in config.nodes)} (active {config.cluster.active}), "
            f"protecting {', '.join(p.path for p in config.protected)}",
            highlight=False,
        )
        return
    for line in plan.diff().splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        style = "bold" if line.startswith(("+++", "---", "@@")) else style
        _console.print(Text(line, style=style or ""))
    for name in plan.added:
        _console.print(f"node {name} is added: certificate from {plan.target.ca_key}")
    for node_dir in plan.differing:
        _console.print(f"note: {node_dir}/cluster.toml differed from the top one; replaced")


def _report(plan: Plan, written: list[Path]) -> None:
    directory = plan.target.directory
    verb = "changed" if plan.target.existing else "created"
    _console.print(f"[green]cluster configuration {verb} in {directory}[/green]", highlight=False)
    for node_dir in written:
        if node_dir == directory:
            _console.print(
                f"  {directory}/cluster.toml  this node's copy: the same file must go to "
                "/etc/stead on every other node",
                highlight=False,
            )
        else:
            _console.print(
                f"  {node_dir}/  checked; copy it to /etc/stead on {node_dir.name}",
                highlight=False,
            )
    for name in plan.removed:
        _console.print(
            f"  node {name} left the cluster: {directory}/nodes/{name}/ was left as it was "
            "(stop that node's agent, then delete it)",
            highlight=False,
        )
    if plan.target.existing:
        _console.print("  restart the agents to use the new configuration", highlight=False)


def main() -> None:
    """``python -m stead.cli.configure``: the command on its own."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(configure)
    try:
        app()
    except SteadError as exc:
        print(f"stead: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
