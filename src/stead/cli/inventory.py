"""``stead inventory``: every node with its management identity, role and state.

For Ansible, patch tools and monitoring: they target passives by their own names while the
active answers on the public one. Roles and states come from the active agent when one
answers; otherwise they are reported as unknown (the configuration still lists the nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from stead.cli.client import AgentClient, find_socket
from stead.cli.options import ConfigDirOption, SocketOption
from stead.config.load import load
from stead.config.paths import config_dir
from stead.config.schema import ClusterConfig
from stead.errors import SteadError, UsageError

FORMATS = ("json", "ansible", "hosts")


def inventory(
    fmt: Annotated[
        str, typer.Option("--format", help="json, ansible (INI inventory) or hosts (/etc/hosts)")
    ] = "json",
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """List every node with its management identity, role and state."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    cluster = _cluster(config)
    try:
        status: dict[str, Any] | None = AgentClient(find_socket(socket, config), timeout=5).call(
            "GET", "/v1/status"
        )
    except SteadError:
        status = None
    data = build(cluster, status)
    if fmt == "json":
        print(json.dumps(data, indent=2))
    elif fmt == "ansible":
        print(ansible(data), end="")
    else:
        print(hosts(data), end="")


def _cluster(directory: Path | None) -> ClusterConfig:
    if directory is None:
        from stead.lab.state import find_lab

        lab = find_lab()
        if lab is not None and not (config_dir() / "node.toml").is_file():
            directory = lab.paths(lab.nodes[0]).etc
    return load(config_dir(directory)).cluster


def build(cluster: ClusterConfig, status: dict[str, Any] | None) -> dict[str, Any]:
    """The inventory as data: the public identity and one entry per node."""
    seen = {node["name"]: node for node in (status or {}).get("nodes", [])}
    nodes = []
    for node in cluster.nodes:
        live = seen.get(node.name, {})
        management = node.management
        address = management.address.split("/")[0] if management and management.address else ""
        nodes.append(
            {
                "name": node.name,
                "role": live.get("role", "unknown"),
                "state": live.get("state", "unknown"),
                "hostname": management.hostname if management else node.name,
                "fqdn": management.fqdn if management else "",
                "short_name": management.netbios if management else node.name[:15].upper(),
                "management_address": address,
                "channel_addresses": list(node.addresses),
                "priority": node.priority,
            }
        )
    public = cluster.public
    return {
        "cluster": cluster.cluster.name,
        "epoch": (status or {}).get("epoch"),
        "public": {
            "hostname": public.hostname,
            "fqdn": public.fqdn,
            "short_name": public.short_name,
            "addresses": [a.address.split("/")[0] for a in public.addresses],
            "holder": ((status or {}).get("roles") or {}).get("public_holder"),
        },
        "nodes": nodes,
    }


def ansible(data: dict[str, Any]) -> str:
    """An INI inventory: groups stead_active and stead_passive (children of stead)."""
    groups: dict[str, list[str]] = {"stead_active": [], "stead_passive": [], "stead_unknown": []}
    for node in data["nodes"]:
        name = node["fqdn"] or node["hostname"]
        host = node["management_address"] or node["channel_addresses"][0]
        line = (
            f"{name} ansible_host={host} stead_node={node['name']} stead_role={node['role']}"
            f" stead_state={node['state'].replace(' ', '_')} stead_short_name={node['short_name']}"
        )
        groups.get(f"stead_{node['role']}", groups["stead_unknown"]).append(line)
    out = []
    for group, lines in groups.items():
        if lines:
            out += [f"[{group}]", *lines, ""]
    out += ["[stead:children]", *(g for g, lines in groups.items() if lines), ""]
    return "\n".join(out)


def hosts(data: dict[str, Any]) -> str:
    """/etc/hosts lines: every management name, then the public name."""
    lines = []
    for node in data["nodes"]:
        if node["management_address"]:
            names = [node["fqdn"], node["hostname"], node["short_name"].lower()]
            lines.append(f"{node['management_address']}\t{' '.join(_unique(names))}")
    public = data["public"]
    for address in public["addresses"]:
        names = [public["fqdn"], public["hostname"], public["short_name"].lower()]
        if any(names):
            lines.append(f"{address}\t{' '.join(_unique(names))}")
    return "".join(line + "\n" for line in lines)


def _unique(names: list[str]) -> list[str]:
    found: list[str] = []
    for name in names:
        if name and name not in found:
            found.append(name)
    return found
