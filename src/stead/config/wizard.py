"""``stead configure``: write a new cluster's configuration, or change an existing one.

Answers come from the interactive wizard (:mod:`stead.config.wizard_flow`) or from an answers
file (TOML or JSON) with the keys of ``cluster.toml``. Either way they end as a *draft*, the
plain data of the cluster file, and nothing is written until the whole draft passes the
schema (:mod:`stead.config.wizard_rules`):

1. :func:`resolve_target` tells a new cluster (an empty or missing directory) from an
   existing one (a directory with ``cluster.toml``).
2. :func:`new_draft` or :func:`read_draft` gives the starting draft; :func:`merge_answers`
   lays an answers file over it.
3. :func:`make_plan` validates the draft and works out every file to write, the diff of
   ``cluster.toml``, the nodes added (a certificate from ``ca.key`` each) and removed.
4. :func:`apply_plan` writes. A new cluster is built by ``stead init``'s
   :func:`~stead.config.init.create_cluster` in a temp directory renamed into place at the
   end; an existing one is changed file by file, each written atomically, the top
   ``cluster.toml`` last. Every node directory then passes :func:`~stead.config.load.load`.

In an answers file, sections are merged key by key into the current configuration, and the
lists ``nodes``, ``services`` and ``protected`` are the complete new lists: an entry with the
name (or path) of an existing one keeps the values of the keys it does not give.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from stead import pki
from stead.config.init import NodeSpec, create_cluster, render_cluster, render_node
from stead.config.load import load, read_toml
from stead.config.paths import CLUSTER_FILE, NODE_FILE, config_dir
from stead.config.schema import ClusterConfig
from stead.config.wizard_rules import validate_draft
from stead.config.wizard_toml import sync_document, write_atomic
from stead.errors import ConfigError, UsageError

LIST_IDENTITY = {"nodes": "name", "services": "name", "protected": "path"}
PROBE_ID = "00000000-0000-4000-8000-000000000000"  # stands in until create_cluster makes one
CA_KEY = "ca.key"
CA_CERT = "ca.pem"


@dataclass(frozen=True)
class Target:
    """Where the configuration goes; ``existing`` when it holds a cluster.toml to change."""

    directory: Path
    existing: bool

    @property
    def cluster_file(self) -> Path:
        return self.directory / CLUSTER_FILE

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    def cannot_add_nodes(self) -> str | None:
        """Why nodes cannot be added here (``None``: they can)."""
        if self.existing and not self.ca_key.is_file():
            return (
                f"adding a node needs the cluster CA key {self.ca_key} to issue its "
                f"certificate, and it is missing: run `stead configure` on the directory "
                f"`stead init` wrote (the one holding ca.key)"
            )
        return None


def resolve_target(out: Path | None, config: Path | None) -> Target:
    """``--out DIR``: new cluster, or edit when DIR holds cluster.toml; ``--config-dir DIR``:
    edit. Neither: edit ``$STEAD_CONFIG_DIR`` or ``/etc/stead``."""
    if out is not None and config is not None:
        raise UsageError("give --out DIR (new or existing) or --config-dir DIR, not both")
    if out is not None:
        if (out / CLUSTER_FILE).is_file():
            return Target(out, existing=True)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"{out} is not empty and holds no {CLUSTER_FILE}")
        return Target(out, existing=False)
    directory = config_dir(config)
    if not (directory / CLUSTER_FILE).is_file():
        raise UsageError(
            f"no {CLUSTER_FILE} in {directory}: give --out DIR to create a cluster, "
            "or --config-dir DIR to change one"
        )
    return Target(directory, existing=True)


def new_draft(cluster_name: str = "stead") -> dict[str, Any]:
    """The draft of a new cluster: ``stead init``'s defaults, no nodes or paths yet."""
    draft = tomllib.loads(render_cluster(cluster_name, PROBE_ID, "", [], []))
    draft["nodes"] = []
    draft["protected"] = []
    return draft


def read_draft(target: Target) -> dict[str, Any]:
    """The existing cluster.toml as a draft; it must be valid (fix it by hand otherwise)."""
    draft = read_toml(target.cluster_file)
    validate_draft(draft, str(target.cluster_file))
    return draft


def read_answers(path: Path) -> dict[str, Any]:
    """An answers file: JSON when it ends in ``.json``, TOML otherwise."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("file not found", file=str(path)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", file=str(path)) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}", file=str(path)) from None
    else:
        data = read_toml(path)
    if not isinstance(data, dict):
        raise ConfigError("the answers must be a table (a JSON object)", file=str(path))
    return data


def merge_answers(
    base: dict[str, Any], answers: dict[str, Any], *, source: str, new: bool
) -> dict[str, Any]:
    """Lay the answers over a draft (see the module docstring); the result is not validated."""
    cluster = answers.get("cluster")
    if isinstance(cluster, dict) and "id" in cluster:
        raise ConfigError(
            "cluster.id: generated by stead and never changed; leave it out", file=source
        )
    draft = copy.deepcopy(base)
    for key, value in answers.items():
        current = draft.get(key)
        if key in LIST_IDENTITY and _entries(value) and isinstance(current, list):
            draft[key] = _merge_list(current, value, LIST_IDENTITY[key])
        elif isinstance(value, dict) and isinstance(current, dict):
            current.update(copy.deepcopy(value))
        else:
            draft[key] = copy.deepcopy(value)
    if _entries(draft.get("nodes")):
        # A node the answers add gets what `stead init` gives: the next priority.
        old_names = {node.get("name") for node in base.get("nodes", [])}
        highest = 90
        for node in draft["nodes"]:
            if not isinstance(node.get("name"), str) or node["name"] not in old_names:
                node.setdefault("priority", highest + 10)
                node.setdefault("automatic_failover", True)
            if isinstance(node.get("priority"), int):
                highest = max(highest, node["priority"])
    if new and _entries(draft.get("protected")):
        for entry in draft["protected"]:
            entry.setdefault("include", ["**"])
            entry.setdefault("exclude", [])
    cluster, nodes = draft.get("cluster"), draft.get("nodes")
    if new and isinstance(cluster, dict) and not cluster.get("active") and _entries(nodes):
        cluster["active"] = nodes[0].get("name", "") if nodes else ""  # as `stead init`
    return draft


def _entries(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(entry, dict) for entry in value)


def _merge_list(current: list[Any], wanted: list[Any], key: str) -> list[Any]:
    by_key = {entry.get(key): entry for entry in current if isinstance(entry, dict)}
    merged = []
    for entry in wanted:
        name = entry.get(key)
        old = by_key.get(name) if isinstance(name, str) else None
        merged.append({**copy.deepcopy(old), **copy.deepcopy(entry)} if old else entry)
    return merged


@dataclass
class Plan:
    """Everything one run will write, worked out (and validated) before anything is."""

    target: Target
    draft: dict[str, Any]
    config: ClusterConfig
    old_text: str
    new_text: str
    node_dirs: list[Path] = field(default_factory=list)  # existing; their cluster.toml changes
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # their directories are left alone
    differing: list[Path] = field(default_factory=list)  # node copies that differed before
    issued: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # name: (cert, key)

    @property
    def changed(self) -> bool:
        if not self.target.existing or self.added or self.differing:
            return True
        return self.old_text != self.new_text

    def diff(self) -> str:
        """The unified diff of cluster.toml (of a new one: against nothing)."""
        name = str(self.target.cluster_file)
        return "".join(
            difflib.unified_diff(
                self.old_text.splitlines(keepends=True),
                self.new_text.splitlines(keepends=True),
                fromfile=name if self.target.existing else "/dev/null",
                tofile=name,
            )
        )


def make_plan(target: Target, draft: dict[str, Any], *, source: str = "answers") -> Plan:
    """Validate the draft and work out what to write; raises before anything is written.

    ``source`` names the answers in error messages (the answers file, say).
    """
    config = validate_draft(draft, source)
    if not target.existing:
        nodes = [NodeSpec(n.name, list(n.addresses)) for n in config.nodes]
        template = render_cluster(
            config.cluster.name,
            PROBE_ID,
            config.cluster.active,
            nodes,
            [p.path for p in config.protected],
        )
        preview = {**draft, "cluster": {**draft["cluster"], "id": PROBE_ID}}
        return Plan(target, draft, config, "", render_draft(template, preview))
    old_text = target.cluster_file.read_text()
    old = validate_draft(tomllib.loads(old_text), str(target.cluster_file))
    if draft["cluster"].get("id") != old.cluster.id:
        raise ConfigError("cluster.id: never changes", file=str(target.cluster_file))
    new_text = render_draft(old_text, draft)
    old_names = [n.name for n in old.nodes]
    new_names = [n.name for n in config.nodes]
    plan = Plan(target, draft, config, old_text, new_text)
    plan.added = [name for name in new_names if name not in old_names]
    plan.removed = [name for name in old_names if name not in new_names]
    own = _own_node(target.directory)
    if own is not None and own not in new_names:
        raise UsageError(
            f"{target.directory} is the configuration of node {own!r}, which this change "
            "removes from the cluster: change the cluster where `stead init` wrote it"
        )
    for name in new_names:
        node_dir = target.directory / "nodes" / name
        if name in old_names and (node_dir / CLUSTER_FILE).is_file():
            plan.node_dirs.append(node_dir)
            if (node_dir / CLUSTER_FILE).read_text() != old_text:
                plan.differing.append(node_dir)
    if plan.added:
        plan.issued = _issue(target, config, plan.added)
    return plan


def render_draft(text: str, draft: dict[str, Any]) -> str:
    """``text`` (a cluster.toml) changed to hold ``draft``, comments kept; checked again."""
    doc = tomlkit.parse(text)
    sync_document(doc, draft)
    result = tomlkit.dumps(doc)
    wanted = validate_draft(draft, "answers")
    if validate_draft(tomllib.loads(result), "the new cluster.toml") != wanted:
        raise ConfigError("the rewritten cluster.toml does not say what was asked (a bug)")
    return result


def _own_node(directory: Path) -> str | None:
    """The node a node configuration directory (one with node.toml) belongs to."""
    if not (directory / NODE_FILE).is_file():
        return None
    name = read_toml(directory / NODE_FILE).get("node")
    return name if isinstance(name, str) else None


def _issue(
    target: Target, config: ClusterConfig, names: list[str]
) -> dict[str, tuple[bytes, bytes]]:
    reason = target.cannot_add_nodes()
    if reason:
        raise UsageError(f"cannot add node {', '.join(names)}: {reason}")
    for name in names:
        node_dir = target.directory / "nodes" / name
        if node_dir.exists() and any(node_dir.iterdir()):
            raise UsageError(f"cannot add node {name!r}: {node_dir} exists already (remove it)")
    try:
        ca_cert = (target.directory / CA_CERT).read_bytes()
        ca_key = target.ca_key.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the cluster CA in {target.directory}: {exc}") from None
    return {
        name: pki.issue_node_cert(ca_cert, ca_key, name, list(config.node(name).addresses))
        for name in names
    }


def apply_plan(plan: Plan) -> list[Path]:
    """Write the plan; returns the node configuration directories, each checked by load()."""
    if not plan.target.existing:
        return _create(plan)
    directory = plan.target.directory
    written: list[Path] = []
    ca_cert = (directory / CA_CERT).read_bytes() if plan.added else b""
    for name in plan.added:
        node_dir = directory / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        cert, key = plan.issued[name]
        write_atomic(node_dir / "node.pem", cert.decode())
        pki.write_private(node_dir / "node.key", key)
        write_atomic(node_dir / "ca.pem", ca_cert.decode())
        write_atomic(node_dir / NODE_FILE, render_node(name))
        write_atomic(node_dir / CLUSTER_FILE, plan.new_text)
        written.append(node_dir)
    for node_dir in plan.node_dirs:
        write_atomic(node_dir / CLUSTER_FILE, plan.new_text)
        written.append(node_dir)
    write_atomic(plan.target.cluster_file, plan.new_text)  # the source of the copies, last
    if _own_node(directory) is not None:
        written.append(directory)
    for node_dir in written:
        load(node_dir)
    return written


def _create(plan: Plan) -> list[Path]:
    out = plan.target.directory
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.configure-"))
    try:
        config = plan.config
        create_cluster(
            staging,
            cluster_name=config.cluster.name,
            nodes=[NodeSpec(n.name, list(n.addresses)) for n in config.nodes],
            active=config.cluster.active,
            protect=[p.path for p in config.protected],
        )
        template = (staging / CLUSTER_FILE).read_text()
        generated_id = tomllib.loads(template)["cluster"]["id"]
        draft = {**plan.draft, "cluster": {**plan.draft["cluster"], "id": generated_id}}
        text = render_draft(template, draft)
        node_dirs = [staging / "nodes" / n.name for n in config.nodes]
        for path in [staging, *node_dirs]:
            write_atomic(path / CLUSTER_FILE, text)
        for node_dir in node_dirs:
            load(node_dir)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty, as resolve_target checked
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    plan.new_text = text
    return [out / "nodes" / n.name for n in config.nodes]
