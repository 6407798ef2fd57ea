"""What ``stead lab status`` shows: the lab's address plan, and what runs in each node.

Read-only: it looks at the state file's records and at the live system (links, processes),
and never changes either, so it is safe to call at any time, even while ``up`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stead.lab import dns as labdns
from stead.lab import netns, ssh
from stead.lab.config import DEMO_PORT, PUBLIC_HOSTNAME, NodePaths
from stead.lab.state import LabState, NodeState


def partitioned_from(node: NodeState) -> list[str]:
    """The networks ("channel", "public") whose host-side veth of the node is down."""
    links = {"channel": node.veth, "public": node.pub_veth}
    return [
        network
        for network, veth in links.items()
        if veth and netns.link_exists(veth) and not netns.link_is_up(veth)
    ]


def describe(
    lab_dir: Path, current: LabState | None, paths: Callable[[str], NodePaths], protect: str
) -> dict[str, Any]:
    """The lab at ``lab_dir`` as a JSON-ready mapping (``current`` None: not up)."""
    result: dict[str, Any] = {
        "dir": str(lab_dir),
        "up": current is not None,
        "bridge": netns.BRIDGE,
        "bridge_address": netns.BRIDGE_ADDRESS,
        "bridge_present": netns.link_exists(netns.BRIDGE),
        "public_bridge": netns.PUB_BRIDGE,
        "public_gateway": netns.PUB_GATEWAY,
        "public_bridge_present": netns.link_exists(netns.PUB_BRIDGE),
        "public_hostname": PUBLIC_HOSTNAME,
        "service_address": netns.SERVICE_ADDRESS,
        "service_prefix_len": netns.PREFIX_LEN,
        "service_interface": netns.PUB_IFNAME,
        "service_port": DEMO_PORT,
        "client": {
            "name": netns.CLIENT,
            "netns": netns.client_netns(),
            "address": netns.CLIENT_ADDRESS,
            "veth": netns.client_veth(),
            "present": netns.netns_exists(netns.client_netns()),
        },
        "ssh_config": str(ssh.ClientFiles(lab_dir).ssh_config),
        "client_hosts_file": str(ssh.client_hosts_file()),
        "dns": labdns.describe(lab_dir),
        "active": current.active if current else None,
        "protect": protect,
        "nodes": {},
    }
    for name, node in (current.nodes if current else {}).items():
        node_paths = paths(name)
        holder, agent = node.holder, node.agent
        holder_alive = holder is not None and holder.alive()
        cut = partitioned_from(node)
        result["nodes"][name] = {
            "name": name,
            "address": node.address,
            "channel_address": node.address,
            "public_address": node.public_address,
            "netns": node.netns,
            "veth": node.veth,
            "pub_veth": node.pub_veth,
            "holder_pid": node.holder_pid,
            "holder_alive": holder_alive,
            "agent_pid": node.agent_pid,
            "agent_alive": agent is not None and agent.alive(),
            "sshd_pid": node.sshd_pid,
            "sshd_alive": node.sshd is not None and node.sshd.alive(),
            "management_names": ssh.management_names(name),
            "partitioned": bool(cut),
            "partitioned_from": cut,
            "socket": str(node_paths.socket),
            "fs_path": f"/proc/{node.holder_pid}/root{protect}" if holder_alive else None,
            "config_dir": str(node_paths.etc),
            "state_dir": str(node_paths.state),
            "agent_log": str(node_paths.agent_log),
        }
    return result
