"""Cluster configuration for the lab, in one place so that it follows ``stead init``.

The lab runs ``stead init`` once for the whole cluster (into ``DIR/cluster``), then gives each
node its own configuration directory ``DIR/<node>/etc`` holding ``cluster.toml`` and that
node's files, with two overrides in ``node.toml``: ``state_dir`` and ``api_socket``, both on
the host disk so that the host can reach them.

Each node's ``cluster.toml`` is ``stead init``'s, which stays untouched in ``DIR/cluster``,
plus the lab's settings (``lab_settings``): the public network's gateway as the failover
witness, the service address on ``pub0``, the public name published by DNS to the lab's
server (``stead.lab.dns``), the demo service with its health check, and the timing given to
``stead lab up``. The result is validated against the schema before it is written, so a
lab never starts agents on a configuration ``stead config check`` refuses.

``STEAD_LAB_SKIP_INIT=1`` skips ``stead init`` (the directories are still made), for tests of
the lab itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import ValidationError

from stead.config.schema import ClusterConfig
from stead.errors import LabError
from stead.lab import netns

CLUSTER_NAME = "lab"
SKIP_INIT_ENV = "STEAD_LAB_SKIP_INIT"
NODES_STAMP = ".lab-nodes.json"
PUBLIC_HOSTNAME = "labsvc"
DEMO_SERVICE = "demo"
DEMO_PORT = 8080
DEMO_DATA = "demo"  # under the protected path: the demo's data moves with the service


@dataclass(frozen=True)
class NodePaths:
    """Where one node's files live on the host."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def image(self) -> Path:
        return self.root / "disk.img"

    @property
    def system_image(self) -> Path:
        return self.root / "system.img"

    @property
    def system_mount(self) -> Path:
        """Where the holder mounts the system image, in the node's mount namespace only."""
        return self.root / "system"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def holder_log(self) -> Path:
        return self.root / "holder.log"

    @property
    def holder_pid_file(self) -> Path:
        return self.run / "holder.pid"

    @property
    def agent_pid_file(self) -> Path:
        return self.run / "agent.pid"

    @property
    def ssh(self) -> Path:
        """The node's SSH server files: host key, authorised keys, sshd_config."""
        return self.root / "ssh"

    @property
    def ssh_host_key(self) -> Path:
        return self.ssh / "ssh_host_ed25519_key"

    @property
    def ssh_host_key_pub(self) -> Path:
        return self.ssh / "ssh_host_ed25519_key.pub"

    @property
    def ssh_authorized_keys(self) -> Path:
        return self.ssh / "authorized_keys"

    @property
    def sshd_config(self) -> Path:
        return self.ssh / "sshd_config"

    @property
    def sshd_pid_file(self) -> Path:
        return self.run / "sshd.pid"

    @property
    def sshd_log(self) -> Path:
        return self.root / "sshd.log"

    def make(self) -> None:
        for path in (self.etc, self.state, self.run, self.ssh):
            path.mkdir(parents=True, exist_ok=True)
        # Marks a lab node directory, so that leftovers can be recognised by what backs them.
        (self.root / ".stead-lab-node").touch()


def skip_init() -> bool:
    return os.environ.get(SKIP_INIT_ENV, "") not in ("", "0")


def node_overrides(paths: NodePaths) -> dict[str, str]:
    """Settings the lab puts into each node's ``node.toml``."""
    return {"state_dir": str(paths.state), "api_socket": str(paths.socket)}


def apply_node_overrides(node_toml: Path, overrides: dict[str, str]) -> None:
    """Set top-level keys in ``node.toml`` (before any table, where TOML needs them)."""
    doc = tomlkit.parse(node_toml.read_text()) if node_toml.exists() else tomlkit.document()
    for key, value in overrides.items():
        doc[key] = value
    node_toml.write_text(tomlkit.dumps(doc))


def _run_init(cluster_dir: Path, nodes: dict[str, str], active: str, protect: str) -> None:
    argv = [sys.executable, "-m", "stead", "init", "--cluster-name", CLUSTER_NAME]
    argv += ["--out", str(cluster_dir)]
    for name, address in nodes.items():
        argv += ["--node", f"{name}={address}"]
    argv += ["--active", active, "--protect", protect, "--force"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(
            f"`stead init` failed ({proc.returncode}): {detail}"
            f" (set {SKIP_INIT_ENV}=1 to build a lab without cluster configuration)"
        )


@dataclass(frozen=True)
class Timing:
    """Failover timing given to ``stead lab up``; None keeps what ``stead init`` wrote."""

    heartbeat: float | None = None
    failover_timeout: float | None = None


def demo_service(protect: str) -> dict[str, Any]:
    """The ``[[services]]`` entry of the demo service (``stead.lab.demo_service``)."""
    data = f"{protect.rstrip('/')}/{DEMO_DATA}"
    argv = [sys.executable, "-m", "stead.lab.demo_service", "--port", str(DEMO_PORT)]
    return {
        "name": DEMO_SERVICE,
        "exec": [*argv, "--data", data],
        "checks": [
            {
                "kind": "http",
                "url": f"http://127.0.0.1:{DEMO_PORT}/health",
                "interval": 1.0,
                "timeout": 0.5,
                "failures": 3,
            }
        ],
    }


def _table(doc: tomlkit.TOMLDocument, name: str) -> Any:
    if name not in doc:
        doc[name] = tomlkit.table()
    return doc[name]


# Each node's own system trees (stead.lab.holder mounts them from the node's system image).
SYSTEM_TREES = ["/opt/lab", "/etc/lab"]
# A node's own file, and its own drop-ins in a directory the other nodes need not have.
SYSTEM_PRESERVE = ["/etc/lab/node.conf", "/etc/lab/node.d/*"]
LAB_DOMAIN = "lab.test"  # a reserved test domain: lab names never leak to real DNS


def patch_connect(lab_dir: Path) -> list[str]:
    """How `stead patch` on the host reaches a node: SSH from the client namespace (which
    resolves the lab's names) with the lab's client key and known hosts."""
    ssh_config = lab_dir / netns.CLIENT / "ssh_config"  # stead.lab.ssh.ClientFiles
    return ["ip", "netns", "exec", netns.client_netns(), "ssh", "-F", str(ssh_config), "{fqdn}"]


def lab_settings(
    text: str,
    *,
    protect: str,
    timing: Timing = Timing(),
    connect: list[str] | None = None,
    dns: Mapping[str, Any] | None = None,
) -> str:
    """``stead init``'s ``cluster.toml`` with the lab's settings; refused if invalid.

    ``dns`` is the ``public.dns`` table (``stead.lab.dns.cluster_settings``); with it, each
    node publishes its own public-network address under the public name when active.
    """
    doc = tomlkit.parse(text)
    failover = _table(doc, "failover")
    failover["witnesses"] = [netns.PUB_GATEWAY]
    if timing.failover_timeout is not None:
        failover["timeout"] = timing.failover_timeout
    if timing.heartbeat is not None:
        _table(doc, "channel")["heartbeat"] = timing.heartbeat
    public = _table(doc, "public")
    public["hostname"] = PUBLIC_HOSTNAME
    address = tomlkit.inline_table()
    address.update(
        {"address": f"{netns.SERVICE_ADDRESS}/{netns.PREFIX_LEN}", "interface": netns.PUB_IFNAME}
    )
    addresses = tomlkit.array()
    addresses.append(address)
    public["addresses"] = addresses
    public["service_port"] = DEMO_PORT
    public["fqdn"] = f"{PUBLIC_HOSTNAME}.{LAB_DOMAIN}"
    public["short_name"] = PUBLIC_HOSTNAME.upper()
    if dns is not None:
        table = tomlkit.inline_table()
        table.update(dict(dns))
        public["dns"] = table
    for index, node in enumerate(doc.get("nodes", [])):
        # Each node's own identity while passive: its name, on its public-network address.
        management = tomlkit.inline_table()
        management.update(
            {
                "hostname": node["name"],
                "fqdn": f"{node['name']}.{LAB_DOMAIN}",
                "short_name": str(node["name"]).upper()[:15],
                "address": f"{netns.node_public_address(index)}/{netns.PREFIX_LEN}",
                "interface": netns.PUB_IFNAME,
            }
        )
        node["management"] = management
        if dns is not None:
            # DNS names the active by an address of its own, which must differ between
            # nodes: its public-network address (also its management address). The service
            # address moves too (Linux backend), so clients by address and by name both work.
            node["public_addresses"] = [netns.node_public_address(index)]
    doc["services"] = tomlkit.item([demo_service(protect)])  # an array of tables
    system = _table(doc, "system")
    system["trees"] = SYSTEM_TREES
    system["preserve"] = SYSTEM_PRESERVE
    system["packages"] = "dpkg"
    if connect is not None:
        _table(doc, "patch")["connect"] = connect
    result = tomlkit.dumps(doc)
    try:
        ClusterConfig.model_validate(tomllib.loads(result))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(top level)'}: "
            f"{str(error['msg']).removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise LabError(f"the lab's cluster configuration is invalid: {problems}") from None
    return result


def write_cluster_config(
    lab_dir: Path,
    nodes: dict[str, str],
    node_paths: dict[str, NodePaths],
    *,
    active: str,
    protect: str,
    skip: bool | None = None,
    timing: Timing = Timing(),
    dns: Mapping[str, Any] | None = None,
) -> set[str]:
    """Create the cluster configuration and every node's configuration directory.

    ``nodes`` maps node names to addresses. ``stead init`` runs again only when the set of
    nodes changed, so that a second ``stead lab up`` keeps the cluster's keys. ``skip``
    (default: ``$STEAD_LAB_SKIP_INIT``) only makes the directories. Returns the nodes whose
    configuration files changed (their running agents still have the old ones).
    """
    for paths in node_paths.values():
        paths.make()
    if skip_init() if skip is None else skip:
        return set()
    cluster_dir = lab_dir / "cluster"
    stamp = cluster_dir / NODES_STAMP
    wanted = {"nodes": nodes, "active": active, "protect": protect}
    current = json.loads(stamp.read_text()) if stamp.exists() else None
    if current != wanted or not (cluster_dir / "cluster.toml").exists():
        _run_init(cluster_dir, nodes, active, protect)
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    cluster_toml = lab_settings(
        (cluster_dir / "cluster.toml").read_text(),
        protect=protect,
        timing=timing,
        connect=patch_connect(lab_dir),
        dns=dns,
    )
    changed = set()
    for name, paths in node_paths.items():
        before = _snapshot(paths.etc)
        source = cluster_dir / "nodes" / name
        if not source.is_dir():
            raise LabError(f"`stead init` made no configuration for node {name} in {source}")
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, paths.etc / item.name)
        (paths.etc / "cluster.toml").write_text(cluster_toml)  # the lab's, not init's copy
        apply_node_overrides(paths.etc / "node.toml", node_overrides(paths))
        if _snapshot(paths.etc) != before:
            changed.add(name)
    return changed


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {item.name: item.read_bytes() for item in directory.iterdir() if item.is_file()}
