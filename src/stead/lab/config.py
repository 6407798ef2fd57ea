"""Cluster configuration for the lab, in one place so that it follows ``stead init``.

The lab runs ``stead init`` once for the whole cluster (into ``DIR/cluster``), then gives each
node its own configuration directory ``DIR/<node>/etc`` holding ``cluster.toml`` and that
node's files, with two overrides in ``node.toml``: ``state_dir`` and ``api_socket``, both on
the host disk so that the host can reach them.

``STEAD_LAB_SKIP_INIT=1`` skips ``stead init`` (the directories are still made), for tests of
the lab itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomlkit

from stead.errors import LabError

CLUSTER_NAME = "lab"
SKIP_INIT_ENV = "STEAD_LAB_SKIP_INIT"
NODES_STAMP = ".lab-nodes.json"


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

    def make(self) -> None:
        for path in (self.etc, self.state, self.run):
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


def write_cluster_config(
    lab_dir: Path,
    nodes: dict[str, str],
    node_paths: dict[str, NodePaths],
    *,
    active: str,
    protect: str,
    skip: bool | None = None,
) -> None:
    """Create the cluster configuration and every node's configuration directory.

    ``nodes`` maps node names to addresses. ``stead init`` runs again only when the set of
    nodes changed, so that a second ``stead lab up`` keeps the cluster's keys. ``skip``
    (default: ``$STEAD_LAB_SKIP_INIT``) only makes the directories.
    """
    for paths in node_paths.values():
        paths.make()
    if skip_init() if skip is None else skip:
        return
    cluster_dir = lab_dir / "cluster"
    stamp = cluster_dir / NODES_STAMP
    wanted = {"nodes": nodes, "active": active, "protect": protect}
    current = json.loads(stamp.read_text()) if stamp.exists() else None
    if current != wanted or not (cluster_dir / "cluster.toml").exists():
        _run_init(cluster_dir, nodes, active, protect)
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    for name, paths in node_paths.items():
        shutil.copy2(cluster_dir / "cluster.toml", paths.etc / "cluster.toml")
        source = cluster_dir / "nodes" / name
        if not source.is_dir():
            raise LabError(f"`stead init` made no configuration for node {name} in {source}")
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, paths.etc / item.name)
        apply_node_overrides(paths.etc / "node.toml", node_overrides(paths))
