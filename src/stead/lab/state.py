"""The lab's state file, ``DIR/lab.json``: what was built, and which processes run it.

Written atomically (temporary file, fsync, rename, fsync of the directory), so that a reader
sees either the old or the new state, never half of one. Nothing here trusts the file
blindly: pids come with start times, and names follow the conventions in ``netns``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stead.errors import LabError
from stead.lab.procs import ProcRef

if TYPE_CHECKING:
    from stead.lab.nodes import Lab

STATE_FILE = "lab.json"
LOCK_FILE = ".lab.lock"
FORMAT = 1


@dataclass
class NodeState:
    name: str
    index: int
    address: str
    netns: str
    veth: str
    public_address: str = ""  # "" in state files of labs built before the public network
    pub_veth: str = ""
    holder_pid: int | None = None
    holder_start: int | None = None
    agent_pid: int | None = None
    agent_start: int | None = None
    sshd_pid: int | None = None
    sshd_start: int | None = None

    @property
    def holder(self) -> ProcRef | None:
        if self.holder_pid is None or self.holder_start is None:
            return None
        return ProcRef(self.holder_pid, self.holder_start)

    @property
    def agent(self) -> ProcRef | None:
        if self.agent_pid is None or self.agent_start is None:
            return None
        return ProcRef(self.agent_pid, self.agent_start)

    @property
    def sshd(self) -> ProcRef | None:
        if self.sshd_pid is None or self.sshd_start is None:
            return None
        return ProcRef(self.sshd_pid, self.sshd_start)

    def set_holder(self, ref: ProcRef | None) -> None:
        self.holder_pid, self.holder_start = (ref.pid, ref.start) if ref else (None, None)

    def set_agent(self, ref: ProcRef | None) -> None:
        self.agent_pid, self.agent_start = (ref.pid, ref.start) if ref else (None, None)

    def set_sshd(self, ref: ProcRef | None) -> None:
        self.sshd_pid, self.sshd_start = (ref.pid, ref.start) if ref else (None, None)


@dataclass
class LabState:
    dir: str
    disk_size: str = "2G"
    active: str = "primary"
    protect: str = "/srv/lab"
    agent_cmd: str | None = None
    wait_ready: bool = True
    heartbeat: float | None = None  # None: the configuration's default
    failover_timeout: float | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        nodes = {name: NodeState(**node) for name, node in data.get("nodes", {}).items()}
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "nodes"}
        return cls(**fields, nodes=nodes)


def load(lab_dir: Path) -> LabState | None:
    path = lab_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"unreadable lab state {path}: {exc}") from exc
    try:
        return LabState.from_json(data)
    except TypeError as exc:
        raise LabError(f"lab state {path} does not match this version of Stead: {exc}") from exc


def save(lab_dir: Path, state: LabState) -> None:
    path = lab_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    with open(tmp, "w") as out:
        json.dump(state.to_json(), out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(lab_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove(lab_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (lab_dir / STATE_FILE).unlink()


@contextlib.contextmanager
def locked(lab_dir: Path) -> Iterator[None]:
    """Serialise changes to one lab (two ``stead lab`` commands at once)."""
    lab_dir.mkdir(parents=True, exist_ok=True)
    with open(lab_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_lab() -> Lab | None:
    """The lab at ``$STEAD_LAB_DIR`` or the default directory, if one is up (see ``nodes``)."""
    from stead.lab.nodes import find_lab as find

    return find()
