"""``stead config``: check a configuration."""

from __future__ import annotations

import typer
from rich.console import Console

from stead.cli.options import ConfigDirOption
from stead.config.load import load
from stead.config.paths import config_dir
from stead.errors import ConfigError

app = typer.Typer(help="Check the configuration.", no_args_is_help=True)


@app.command("check")
def check(config: ConfigDirOption = None) -> None:
    """Validate cluster.toml and node.toml; name the file, key and reason of every error."""
    directory = config_dir(config)
    console = Console(stderr=True)
    try:
        loaded = load(directory)
    except ConfigError as exc:
        for problem in exc.problems:
            console.print(f"[red]error[/red] {problem}", highlight=False)
        raise typer.Exit(ConfigError.exit_code) from None
    cluster = loaded.cluster
    Console().print(
        f"[green]ok[/green] {directory}: cluster {cluster.cluster.name!r}, "
        f"{len(cluster.nodes)} nodes, this node {loaded.name!r}, "
        f"{len(cluster.protected)} protected path(s)",
        highlight=False,
    )
