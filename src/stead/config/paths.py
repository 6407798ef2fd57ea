"""Where a node's configuration lives: names only, so that a client can find its agent
without loading the configuration's models."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_DIR = Path("/etc/stead")
CLUSTER_FILE = "cluster.toml"
NODE_FILE = "node.toml"
DEFAULT_API_SOCKET = "/run/stead/agent.sock"


def config_dir(explicit: Path | str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("STEAD_CONFIG_DIR")
    return Path(env) if env else DEFAULT_CONFIG_DIR


def resolve(directory: Path, value: str) -> Path:
    """A path from the node file, relative ones taken from the configuration directory."""
    candidate = Path(value)
    return candidate if candidate.is_absolute() else directory / candidate
