"""The clone provider seam's conformance suite: every provider passes it, fakes included.

Each provider runs against its own world, built for the test:

- ``builtin``: the real :class:`~stead.reclone.swap.Swapper` and planner on three trees in a
  temporary directory (one per node); the "agent" that starts and reports a rebuild is a
  small in-process backend that plans, copies locally and swaps.
- ``libvirt``: libvirt itself, its test driver (``test:///default``, in the client library):
  three domains on volumes of the default pool.

A world tells what a node is "in the provider's sense" (:meth:`World.fingerprint`: the trees
without preserved paths; the domain definition without what makes a domain itself, and its
disks' sizes) and what the whole world holds (:meth:`World.everything`).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stead.config.system import PathSet
from stead.errors import RecloneError
from stead.reclone.builtin import collect
from stead.reclone.plan import make_plan
from stead.reclone.providers import BuiltinProvider, CloneProvider
from stead.reclone.staging import make_symlink
from stead.reclone.swap import AREA, Swapper, set_meta
from stead.system.manifest import Scope

libvirt = pytest.importorskip("libvirt")

from stead.reclone.providers import libvirt_xml as lx  # noqa: E402
from stead.reclone.providers.libvirt import LibvirtProvider  # noqa: E402

NODES = ("primary", "second", "third")
ACTIVE, NODE, OTHER = NODES


@dataclass
class World:
    provider: CloneProvider
    fingerprint: Callable[[str], object]
    everything: Callable[[], object]


# ---- the built-in provider's world ---------------------------------------------------------


def _tree_state(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel in skip or rel.split("/")[0] in skip:
            continue
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", str(path.readlink()))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777)
        else:
            out[rel] = ("file", st.st_mode & 0o7777, path.read_bytes())
    return out


PRESERVED = ("node.conf", "etc/hostname")


def _populate(root: Path, node: str, version: str) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"{node}.example\n")
    (root / "node.conf").write_text(f"name = {node}\n")
    (root / "app" / "bin").mkdir(parents=True)
    (root / "app" / "VERSION").write_text(f"{version}\n")
    (root / "app" / "bin" / "tool").write_text(f"#!/bin/sh\necho {version}\n")
    (root / "app" / "bin" / "tool").chmod(0o755)
    (root / "current").symlink_to("app/VERSION")
    if version == "1.0":
        (root / "app" / "old-only").write_text("gone after a reclone\n")
    else:
        (root / "app" / "new-dir").mkdir()
        (root / "app" / "new-dir" / "data").write_bytes(bytes(range(256)) * 64)


class FakeAgent:
    """The agent's side of the built-in provider, in-process: start, status, rollback...

    A start runs the whole rebuild at once (plan, local copy, swap) and leaves its outcome
    for ``status``, as the passive's :class:`~stead.reclone.builtin.Rebuilder` does."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.statuses: dict[str, dict[str, Any]] = {}

    def tree(self, node: str) -> Path:
        return self.base / node

    def swapper(self, node: str) -> Swapper:
        return Swapper(self.base / "state" / node)

    def nodes(self) -> list[str]:
        return list(NODES)

    async def start(
        self, node: str, *, active: str, run: str, delete_original: bool, dry_run: bool
    ) -> None:
        status: dict[str, Any] = {"run": run, "phase": "done", "error": ""}
        self.statuses[node] = status
        try:
            status["summary"] = self._rebuild(node, active, run, delete_original, dry_run)
        except RecloneError as exc:
            status.update(phase="failed", error=str(exc))

    def _rebuild(
        self, node: str, active: str, run: str, delete_original: bool, dry_run: bool
    ) -> dict[str, int]:
        src, dst = str(self.tree(active)), str(self.tree(node))
        scope = Scope(trees=(src,), exclude=(AREA,))
        source = {dst + p[len(src) :]: i for p, i in collect(scope, serving=True).items()}
        here = collect(Scope(trees=(dst,), exclude=(AREA,)), serving=False)
        preserved = PathSet([f"{dst}/{p}" for p in PRESERVED])
        work = make_plan(run, [dst], source, here, preserved, delete_original=delete_original)
        if dry_run:
            return work.summary()
        swapper = self.swapper(node)
        swapper.begin(work.plan)
        for fetch in work.fetch:
            if fetch.item.kind == "symlink":
                make_symlink(fetch)
            else:
                shutil.copyfile(src + fetch.path[len(dst) :], fetch.staged)
                set_meta(fetch.staged, fetch.item.meta)
        swapper.swap(work.plan)
        return work.summary()

    async def status(self, node: str) -> dict[str, Any]:
        return dict(self.statuses.get(node, {"run": "", "phase": "idle"}))

    async def rollback(self, node: str) -> dict[str, Any]:
        plan = self.swapper(node).rollback()
        return {"run": plan.run, "operations": len(plan.ops)}

    async def delete_original(self, node: str) -> None:
        self.swapper(node).delete_generation()

    async def generation(self, node: str) -> dict[str, Any] | None:
        plan = self.swapper(node).generation()
        if plan is None:
            return None
        return {"run": plan.run, "delete_original": plan.delete_original}

    async def preserved(self, node: str) -> dict[str, str]:
        return {p: (self.tree(node) / p).read_text() for p in PRESERVED}


def builtin_world(base: Path) -> World:
    agent = FakeAgent(base)
    for node in NODES:
        _populate(agent.tree(node), node, "2.0" if node == ACTIVE else "1.0")

    def fingerprint(node: str) -> object:
        return _tree_state(agent.tree(node), skip=(*PRESERVED, AREA))

    def everything() -> object:
        return {
            "trees": {node: _tree_state(agent.tree(node)) for node in NODES},
            "state": sorted(str(p) for p in (base / "state").rglob("*"))
            if (base / "state").exists()
            else [],
        }

    provider = BuiltinProvider(agent, poll=0)
    return World(provider, fingerprint, everything)


# ---- the libvirt provider's world -----------------------------------------------------------

URI = "test:///default"
POOL = "default-pool"
DOMAINS = {node: f"vm-{node}" for node in NODES}
PRESERVE = {
    node: {
        "hostname": f"{node}.example",
        "management_address": f"198.18.0.{index + 10}",
        "node_key": f"/var/lib/stead/{node}/node.key",
        "machine_id": f"{index + 1:032x}",
    }
    for index, node in enumerate(NODES)
}
MIB = 1024 * 1024


def domain_xml(node: str, *, vcpus: int, memory_mib: int, disk: str, mac: str) -> str:
    """A small test-driver domain: its disk is a volume of the default pool."""
    if disk == "volume":
        source = (
            f"<disk type='volume' device='disk'><source pool='{POOL}' volume='vm-{node}.qcow2'/>"
        )
    else:
        source = f"<disk type='file' device='disk'><source file='/{POOL}/vm-{node}.qcow2'/>"
    return (
        f"<domain type='test'><name>vm-{node}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
        "<os><type arch='i686'>hvm</type></os><devices>"
        f"{source}<target dev='vda' bus='virtio'/></disk>"
        "<disk type='file' device='cdrom'><source file='/isos/tools.iso'/>"
        "<target dev='hdc' bus='ide'/><readonly/></disk>"
        f"<interface type='network'><mac address='{mac}'/><source network='default'/>"
        "</interface></devices></domain>"
    )


def populate_libvirt(conn: Any) -> None:
    pool = conn.storagePoolLookupByName(POOL)
    for index, node in enumerate(NODES):
        size = (20 if node == ACTIVE else 10) * MIB
        pool.createXML(
            f"<volume><name>vm-{node}.qcow2</name><capacity unit='bytes'>{size}</capacity>"
            "<target><format type='qcow2'/></target></volume>",
            0,
        )
        xml = domain_xml(
            node,
            vcpus=4 if node == ACTIVE else 1,
            memory_mib=2048 if node == ACTIVE else 1024,
            disk="file" if index % 2 == 0 else "volume",
            mac=f"52:54:00:00:00:{index + 1:02x}",
        )
        conn.defineXML(xml).create()


def libvirt_fingerprint(conn: Any, domain: str) -> object:
    dom = conn.lookupByName(domain)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    sizes = []
    for disk in lx.disks(xml):
        if disk.kind == "volume":
            vol = conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
        else:
            vol = conn.storageVolLookupByPath(disk.path)
        sizes.append((disk.target, vol.info()[1]))
    return lx.normalised(xml), dom.isActive(), sizes


def libvirt_everything(conn: Any) -> object:
    domains = {
        dom.name(): (dom.UUIDString(), dom.isActive(), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for dom in conn.listAllDomains(0)
    }
    return domains, sorted(conn.storagePoolLookupByName(POOL).listVolumes())


def libvirt_world(conn: Any, **options: Any) -> World:
    populate_libvirt(conn)
    provider = LibvirtProvider(URI, DOMAINS, PRESERVE, **options)
    return World(
        provider,
        lambda node: libvirt_fingerprint(conn, DOMAINS[node]),
        lambda: libvirt_everything(conn),
    )


def reset_libvirt(conn: Any) -> None:
    """Back to the driver's default state: its own "test" domain and an empty pool. (The
    state lives as long as any connection, and a domain object holds its connection.)"""
    for dom in conn.listAllDomains(0):
        if dom.name() == "test":
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    for vol in conn.storagePoolLookupByName(POOL).listAllVolumes(0):
        vol.delete(0)


@pytest.fixture
def inspector() -> Iterator[Any]:
    """A second connection to the test driver: it sees the provider's world (the default
    state is shared by the connections of a process)."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    reset_libvirt(conn)
    try:
        yield conn
    finally:
        reset_libvirt(conn)
        conn.close()


@pytest.fixture(params=["builtin", "libvirt"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    if request.param == "builtin":
        made = builtin_world(tmp_path)
    else:
        made = libvirt_world(request.getfixturevalue("inspector"))
    try:
        yield made
    finally:
        await made.provider.close()


# ---- the properties ------------------------------------------------------------------------


async def test_plan_changes_nothing(world: World) -> None:
    before = world.everything()
    plan = await world.provider.plan(NODE, active=ACTIVE, run="r1")
    assert (plan.node, plan.active, plan.provider) == (NODE, ACTIVE, world.provider.name)
    assert plan.steps
    assert world.everything() == before
    assert await world.provider.generation(NODE) is None


async def test_clone_makes_the_node_a_copy_and_keeps_its_preserved_configuration(
    world: World,
) -> None:
    provider = world.provider
    preserved = await provider.preserved(NODE)
    active_before, other_before = world.fingerprint(ACTIVE), world.fingerprint(OTHER)
    assert world.fingerprint(NODE) != active_before
    phases: list[str] = []
    result = await provider.clone(
        NODE, active=ACTIVE, run="r1", progress=lambda u: phases.append(u["phase"])
    )
    assert world.fingerprint(NODE) == active_before
    assert world.fingerprint(ACTIVE) == active_before
    assert world.fingerprint(OTHER) == other_before
    assert await provider.preserved(NODE) == preserved
    assert result.preserved == preserved
    assert result.generation is not None
    assert (result.run, result.generation.run, result.generation.deleted) == ("r1", "r1", False)
    generation = await provider.generation(NODE)
    assert generation is not None
    assert (generation.run, generation.deleted) == ("r1", False)
    assert phases[-1] == "done"


async def test_rollback_restores_the_original(world: World) -> None:
    provider = world.provider
    original, preserved = world.fingerprint(NODE), await provider.preserved(NODE)
    await provider.clone(NODE, active=ACTIVE, run="r1")
    used = await provider.rollback(NODE)
    assert used.run == "r1"
    assert world.fingerprint(NODE) == original
    assert await provider.preserved(NODE) == preserved
    assert await provider.generation(NODE) is None
    with pytest.raises(RecloneError, match="generation"):
        await provider.rollback(NODE)


async def test_one_generation_per_node_the_newest(world: World) -> None:
    provider = world.provider
    await provider.clone(NODE, active=ACTIVE, run="r1")
    await provider.clone(NODE, active=ACTIVE, run="r2")
    generation = await provider.generation(NODE)
    assert generation is not None
    assert generation.run == "r2"
    await provider.rollback(NODE)  # back to what r1 made: a copy of the active
    assert world.fingerprint(NODE) == world.fingerprint(ACTIVE)
    assert await provider.generation(NODE) is None


@pytest.mark.parametrize("when", ["with the clone", "afterwards"])
async def test_a_deleted_original_cannot_be_rolled_back_to(world: World, when: str) -> None:
    provider = world.provider
    if when == "with the clone":
        result = await provider.clone(NODE, active=ACTIVE, run="r1", delete_original=True)
        assert result.generation is not None
        assert result.generation.deleted
    else:
        await provider.clone(NODE, active=ACTIVE, run="r1")
        await provider.delete_original(NODE)
    await provider.delete_original(NODE)  # idempotent
    generation = await provider.generation(NODE)
    assert generation is not None
    assert generation.deleted
    copy = world.fingerprint(NODE)
    with pytest.raises(RecloneError, match="deleted"):
        await provider.rollback(NODE)
    assert world.fingerprint(NODE) == copy == world.fingerprint(ACTIVE)


async def test_unknown_nodes_and_the_active_are_refused(world: World) -> None:
    provider = world.provider
    before = world.everything()
    calls = [
        provider.plan("ghost", active=ACTIVE, run="r1"),
        provider.plan(NODE, active="ghost", run="r1"),
        provider.clone("ghost", active=ACTIVE, run="r1"),
        provider.clone(ACTIVE, active=ACTIVE, run="r1"),
        provider.rollback("ghost"),
        provider.delete_original("ghost"),
        provider.generation("ghost"),
        provider.preserved("ghost"),
    ]
    for call in calls:
        with pytest.raises(RecloneError, match=r"ghost|active"):
            await call
    assert world.everything() == before
    assert sorted(provider.nodes()) == sorted(NODES)
    assert provider.describe()["provider"] == provider.name
