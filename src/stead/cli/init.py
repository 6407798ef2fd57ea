"""``stead init``: create a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from stead.config.init import create_cluster, parse_node_spec


def init(
    node: Annotated[
        list[str],
        typer.Option("--node", "-n", help="NAME=ADDRESS[,ADDRESS] of a node; repeat per node."),
    ],
    protect: Annotated[
        list[str], typer.Option("--protect", "-p", help="A protected path; repeat for more.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the files.")] = Path(
        "stead-cluster"
    ),
    cluster_name: Annotated[str, typer.Option("--cluster-name", help="A name for humans.")] = (
        "stead"
    ),
    active: Annotated[
        str | None, typer.Option("--active", help="The node that starts active (default: first).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Create a cluster: CA, a certificate per node, cluster.toml and node-local files."""
    specs = [parse_node_spec(text) for text in node]
    create_cluster(
        out, cluster_name=cluster_name, nodes=specs, active=active, protect=protect, force=force
    )
    console = Console()
    console.print(f"[green]cluster created in {out}[/green]")
    console.print(f"  {out}/cluster.toml   the cluster configuration (same on every node)")
    console.print(f"  {out}/ca.pem, ca.key the cluster CA (keep ca.key offline)")
    for spec in specs:
        console.print(
            f"  {out}/nodes/{spec.name}/  copy to /etc/stead on {spec.name} "
            f"({', '.join(spec.addresses)})"
        )
