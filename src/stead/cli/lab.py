"""``stead lab``: several Stead hosts on one machine, as Linux namespaces."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stead.cli.options import JsonOption
from stead.lab.nodes import DEFAULT_LAB_DIR, LAB_DIR_ENV, Lab, default_dir, down_all

app = typer.Typer(
    help="A local multi-node lab: every node a set of Linux namespaces running a real agent.",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        "-d",
        help=f"Lab directory (default: ${LAB_DIR_ENV} or {DEFAULT_LAB_DIR}).",
        show_default=False,
    ),
]
NodeArgument = Annotated[str, typer.Argument(help="Node name: primary, secondary, ...")]


def _lab(directory: Path | None) -> Lab:
    return Lab(directory if directory is not None else default_dir())


def render(data: dict[str, Any]) -> Table:
    title = f"lab {data['dir']} · bridge {data['bridge']} {data['bridge_address']}/24"
    table = Table(title=title, title_justify="left")
    for column in ("node", "address", "holder", "agent", "network", "socket", "files"):
        table.add_column(column)
    for node in data["nodes"].values():
        holder = f"{node['holder_pid']}" if node["holder_alive"] else "[red]down[/red]"
        agent = f"{node['agent_pid']}" if node["agent_alive"] else "[red]stopped[/red]"
        network = "[red]partitioned[/red]" if node["partitioned"] else "[green]up[/green]"
        name = node["name"] + (" (active)" if node["name"] == data["active"] else "")
        table.add_row(
            name,
            node["address"],
            holder,
            agent,
            network,
            node["socket"],
            node["fs_path"] or "-",
        )
    return table


@app.command()
def up(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, max=200)] = 3,
    directory: DirOption = None,
    disk_size: Annotated[str, typer.Option("--disk-size", help="Per-node disk image.")] = "2G",
) -> None:
    """Build the lab, or complete it (a second `up` keeps what runs and repairs the rest)."""
    lab = _lab(directory)
    data = lab.up(nodes, disk_size)
    Console().print(render(data))


@app.command()
def down(
    directory: DirOption = None,
    every: Annotated[
        bool, typer.Option("--all", help="Remove every lab on this machine, by name.")
    ] = False,
) -> None:
    """Remove the lab's processes, namespaces, mounts, loop devices and links (files stay)."""
    if not every:
        _lab(directory).down()
        return
    for item in down_all(directory):
        print(f"removed {item}")


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(
    node: NodeArgument,
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    directory: DirOption = None,
) -> None:
    """Run a command inside a node: `stead lab exec primary -- stead status`."""
    lab = _lab(directory)
    argv = lab.command(node, command, cwd=_cwd())
    os.execvpe(argv[0], argv, lab.node_env(node))


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


@app.command()
def kill(node: NodeArgument, directory: DirOption = None) -> None:
    """SIGKILL the node's agent and everything in its process group."""
    _lab(directory).kill(node)


@app.command()
def stop(
    node: NodeArgument,
    directory: DirOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 10.0,
) -> None:
    """Stop the node's agent: SIGTERM, then SIGKILL after --timeout."""
    _lab(directory).stop(node, timeout)


@app.command()
def start(node: NodeArgument, directory: DirOption = None) -> None:
    """Start the node's agent again."""
    _lab(directory).start(node)


@app.command()
def partition(node: NodeArgument, directory: DirOption = None) -> None:
    """Cut the node off the network (its link to the bridge goes down)."""
    _lab(directory).partition(node)


@app.command()
def drop(
    node: NodeArgument,
    percent: Annotated[float, typer.Argument(help="Frames to drop, 0-100 (0 clears).")],
    directory: DirOption = None,
) -> None:
    """Drop a share of the node's frames at random (nftables; works where netem is absent)."""
    _lab(directory).drop(node, percent)


@app.command()
def heal(
    node: Annotated[str | None, typer.Argument(help="Node to reconnect (default: all).")] = None,
    directory: DirOption = None,
) -> None:
    """Reconnect a partitioned node, or all of them."""
    _lab(directory).heal(node)


@app.command()
def status(as_json: JsonOption = False, directory: DirOption = None) -> None:
    """Show the nodes: addresses, holder and agent pids, network, socket, file system."""
    data = _lab(directory).status()
    if as_json:
        print(json.dumps(data, indent=2))
    elif not data["up"]:
        print(f"no lab is up in {data['dir']}")
    else:
        Console().print(render(data))
