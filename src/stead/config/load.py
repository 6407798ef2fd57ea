"""Find, read and validate the configuration; every problem names its file, key and reason."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from stead.config.paths import CLUSTER_FILE, NODE_FILE, config_dir, resolve
from stead.config.schema import ClusterConfig, NodeConfig
from stead.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Loaded:
    """A validated configuration with its files' locations resolved."""

    directory: Path
    cluster: ClusterConfig
    node: NodeConfig

    def path(self, value: str) -> Path:
        """A path from the node file, relative ones taken from the configuration directory."""
        return resolve(self.directory, value)

    @property
    def state_dir(self) -> Path:
        return self.path(self.node.state_dir)

    @property
    def api_socket(self) -> Path:
        return self.path(self.node.api_socket)

    @property
    def name(self) -> str:
        return self.node.node


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except PermissionError:
        raise ConfigError("permission denied", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(path)) from None


def _validate(model: type[M], data: dict[str, Any], path: Path) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(
            "; ".join(problems), file=str(path), problems=[f"{path}: {p}" for p in problems]
        ) from None


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error.get("loc", ())) or "(top level)"
    message = str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unknown key (misspelt?)"
    return f"{key}: {message}"


def load_cluster(path: Path) -> ClusterConfig:
    return _validate(ClusterConfig, read_toml(path), path)


def load(directory: Path | str | None = None) -> Loaded:
    """Load and cross-check the cluster file and the node file of one configuration dir."""
    base = config_dir(directory)
    problems: list[str] = []
    cluster: ClusterConfig | None = None
    node: NodeConfig | None = None
    try:
        cluster = load_cluster(base / CLUSTER_FILE)
    except ConfigError as exc:
        problems.extend(exc.problems)
    node_path = base / NODE_FILE
    try:
        node = _validate(NodeConfig, read_toml(node_path), node_path)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if node is not None:
        for key in ("cert", "key", "ca"):
            value = Path(getattr(node, key))
            file = value if value.is_absolute() else base / value
            if not file.is_file():
                problems.append(f"{node_path}: {key}: file {file} does not exist")
    if cluster is not None and node is not None:
        names = [n.name for n in cluster.nodes]
        if node.node not in names:
            problems.append(
                f"{node_path}: node: {node.node!r} is not one of the cluster's nodes "
                f"({', '.join(names)})"
            )
    if problems:
        raise ConfigError(problems[0], file=str(base), problems=problems)
    assert cluster is not None and node is not None
    return Loaded(base, cluster, node)
