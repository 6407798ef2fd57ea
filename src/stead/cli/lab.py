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
from stead.lab.nodes import DEFAULT_LAB_DIR, LAB_DIR_ENV, Lab, Network, default_dir, down_all

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
NetworkOption = Annotated[
    Network,
    typer.Option(
        "--network",
        help="channel (the agents' links), public (clients and the gateway), or all.",
    ),
]


def _lab(directory: Path | None) -> Lab:
    return Lab(directory if directory is not None else default_dir())


def render(data: dict[str, Any]) -> Table:
    client = data["client"]
    title = (
        f"lab {data['dir']}\n"
        f"channel network: bridge {data['bridge']} {data['bridge_address']}/24\n"
        f"public network:  bridge {data['public_bridge']} {data['public_gateway']}/24 (gateway),"
        f" service {data['service_address']}/{data['service_prefix_len']}"
        f" port {data['service_port']} on the active's {data['service_interface']},"
        f" client {client['address']} (`stead lab exec {client['name']} -- ...`)\n"
        f"management: `stead lab ssh NODE.lab.test` from the client (ssh_config"
        f" {data['ssh_config']}, names in {data['client_hosts_file']})"
    )
    table = Table(title=title, title_justify="left")
    columns = ("node", "channel", "public", "holder", "agent", "sshd", "network", "socket", "files")
    for column in columns:
        table.add_column(column)
    for node in data["nodes"].values():
        holder = f"{node['holder_pid']}" if node["holder_alive"] else "[red]down[/red]"
        agent = f"{node['agent_pid']}" if node["agent_alive"] else "[red]stopped[/red]"
        sshd = f"{node['sshd_pid']}" if node["sshd_alive"] else "[red]stopped[/red]"
        cut = " + ".join(node["partitioned_from"])
        network = f"[red]cut: {cut}[/red]" if cut else "[green]up[/green]"
        name = node["name"] + (" (active)" if node["name"] == data["active"] else "")
        table.add_row(
            name,
            node["channel_address"],
            node["public_address"],
            holder,
            agent,
            sshd,
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
    heartbeat: Annotated[
        float | None,
        typer.Option(
            "--heartbeat",
            help="Seconds between heartbeats (channel.heartbeat); kept by later `up`s.",
            show_default=False,
        ),
    ] = None,
    failover_timeout: Annotated[
        float | None,
        typer.Option(
            "--failover-timeout",
            help="Seconds of silence before a passive takes over (failover.timeout);"
            " kept by later `up`s.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Build the lab, or complete it (a second `up` keeps what runs and repairs the rest).

    Agents whose configuration changed (for example by --heartbeat) are restarted.
    """
    lab = _lab(directory)
    data = lab.up(nodes, disk_size, heartbeat=heartbeat, failover_timeout=failover_timeout)
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
    node: Annotated[str, typer.Argument(help="Node name (primary, secondary, ...) or `client`.")],
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    directory: DirOption = None,
) -> None:
    """Run a command inside a node, or in the client's network namespace:
    `stead lab exec primary -- stead status`, `stead lab exec client -- curl ...`."""
    lab = _lab(directory)
    argv = lab.command(node, command, cwd=_cwd())
    os.execvpe(argv[0], argv, lab.node_env(node))


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


@app.command(
    "ssh",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def ssh_(
    host: Annotated[
        str,
        typer.Argument(help="primary.lab.test, secondary, labsvc.lab.test (the active), ..."),
    ],
    command: Annotated[
        list[str] | None, typer.Argument(help="Remote command (after --); none: a login shell.")
    ] = None,
    directory: DirOption = None,
) -> None:
    """Log in as root over SSH from the client namespace, which resolves the nodes'
    management names and the public name: `stead lab ssh primary.lab.test -- hostname`.
    The command runs in the remote shell, as with ssh."""
    lab = _lab(directory)
    argv = lab.ssh_command(host, command or [])
    os.execvpe(argv[0], argv, lab.node_env("client"))


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
def partition(
    node: NodeArgument, network: NetworkOption = "all", directory: DirOption = None
) -> None:
    """Cut the node off a network, or both (its link to that bridge goes down)."""
    _lab(directory).partition(node, network)


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
    network: NetworkOption = "all",
    directory: DirOption = None,
) -> None:
    """Reconnect a partitioned node, or all of them, to both networks (or --network)."""
    _lab(directory).heal(node, network)


@app.command()
def status(as_json: JsonOption = False, directory: DirOption = None) -> None:
    """Show the address plan and the nodes: holder and agent pids, links, socket, files."""
    data = _lab(directory).status()
    if as_json:
        print(json.dumps(data, indent=2))
    elif not data["up"]:
        print(f"no lab is up in {data['dir']}")
    else:
        Console().print(render(data))
