"""The libvirt provider against libvirt's test driver (``test:///default``): what the
conformance suite does not say about virtual machines: names, UUIDs, MACs, volumes,
metadata, refusals and undoing a failed clone."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from stead.errors import RecloneError

libvirt = pytest.importorskip("libvirt")

from test_provider_conformance import (  # noqa: E402
    DOMAINS,
    POOL,
    PRESERVE,
    URI,
    inspector,
    libvirt_everything,
    populate_libvirt,
)

from stead.reclone.providers import libvirt_xml as lx  # noqa: E402
from stead.reclone.providers.libvirt import LibvirtProvider  # noqa: E402

__all__ = ["inspector"]  # the fixture, shared with the conformance suite

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


@pytest.fixture
async def world(inspector: Any) -> AsyncIterator[tuple[LibvirtProvider, Any]]:
    populate_libvirt(inspector)
    provider = LibvirtProvider(URI, DOMAINS, PRESERVE)
    try:
        yield provider, inspector
    finally:
        await provider.close()


def _record(conn: Any, name: str) -> lx.Record:
    dom = conn.lookupByName(name)
    text = dom.metadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, lx.NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
    )
    return lx.Record.from_xml(text)


def _without_empty_metadata(world: Any) -> Any:
    domains, volumes = world
    return {
        k: (u, a, x.replace("  <metadata/>\n", "")) for k, (u, a, x) in domains.items()
    }, volumes


def _volumes(conn: Any) -> list[str]:
    return sorted(conn.storagePoolLookupByName(POOL).listVolumes())


async def test_the_new_machine_is_the_nodes_own(world: tuple[LibvirtProvider, Any]) -> None:
    provider, conn = world
    active, old = conn.lookupByName("vm-primary"), conn.lookupByName("vm-second")
    active_uuid, old_uuid = active.UUIDString(), old.UUIDString()
    old_macs = lx.macs(old.XMLDesc(INACTIVE))
    await provider.clone("second", active="primary", run="r1")

    new = conn.lookupByName("vm-second")
    xml = new.XMLDesc(INACTIVE)
    assert new.isActive()
    assert new.UUIDString() not in (active_uuid, old_uuid)
    assert lx.macs(xml) == old_macs  # the node's addresses, never the active's
    assert lx.macs(xml) != lx.macs(active.XMLDesc(INACTIVE))
    disks = {d.target: d for d in lx.disks(xml)}
    assert disks["vda"].path == f"/{POOL}/vm-second-r1-vda.qcow2"
    assert "/isos/tools.iso" in xml  # shared media (the CD-ROM) stay shared
    clone = conn.storageVolLookupByPath(disks["vda"].path)
    assert clone.info()[1] == 20 * 1024 * 1024  # the active's size, not the node's old 10
    assert "qcow2" in clone.XMLDesc(0)
    assert active.isActive()  # paused for the copy, running again

    kept = conn.lookupByName("vm-second-orig-r1")
    assert kept.UUIDString() == old_uuid
    assert not kept.isActive()
    record = _record(conn, "vm-second-orig-r1")
    assert (record.role, record.node, record.run, record.was_running) == (
        "original",
        "second",
        "r1",
        True,
    )


async def test_the_preserved_configuration_is_in_the_domains_metadata(
    world: tuple[LibvirtProvider, Any],
) -> None:
    provider, conn = world
    await provider.clone("second", active="primary", run="r1")
    record = _record(conn, "vm-second")
    assert record.role == "node"
    assert record.preserve == PRESERVE["second"]
    assert record.original == "vm-second-orig-r1"
    assert record.volumes == [lx.VolumeRef(POOL, "vm-second-r1-vda.qcow2")]
    # the raw element, as any libvirt client sees it
    raw = conn.lookupByName("vm-second").XMLDesc(0)
    assert lx.NAMESPACE in raw
    assert "198.18.0.11" in raw


async def test_the_customize_hook_gets_the_disks_and_configuration(inspector: Any) -> None:
    populate_libvirt(inspector)
    seen: list[tuple[str, list[str], Mapping[str, str]]] = []
    provider = LibvirtProvider(URI, DOMAINS, PRESERVE, customize=lambda *args: seen.append(args))
    try:
        await provider.clone("third", active="primary", run="r1")
    finally:
        await provider.close()
    assert seen == [("vm-third", [f"/{POOL}/vm-third-r1-vda.qcow2"], PRESERVE["third"])]


async def test_a_failed_clone_is_undone(inspector: Any) -> None:
    populate_libvirt(inspector)
    before = libvirt_everything(inspector)

    def broken(*_: object) -> None:
        raise OSError("virt-customize exited with status 1")

    provider = LibvirtProvider(URI, DOMAINS, PRESERVE, customize=broken)
    try:
        with pytest.raises(
            RecloneError, match="giving vm-second its configuration failed: virt-customize"
        ):
            await provider.clone("second", active="primary", run="r1")
        assert await provider.generation("second") is None
    finally:
        await provider.close()
    # same domains, UUIDs, states, definitions and volumes; libvirt leaves an empty
    # <metadata/> where the rollback record was
    after = libvirt_everything(inspector)
    assert _without_empty_metadata(after) == _without_empty_metadata(before)


async def test_delete_original_removes_its_volumes_too(world: tuple[LibvirtProvider, Any]) -> None:
    provider, conn = world
    await provider.clone("second", active="primary", run="r1", delete_original=True)
    names = [d.name() for d in conn.listAllDomains(0)]
    assert "vm-second-orig-r1" not in names
    assert "vm-second.qcow2" not in _volumes(conn)
    assert {"vm-primary.qcow2", "vm-third.qcow2", "vm-second-r1-vda.qcow2"} <= set(_volumes(conn))
    assert _record(conn, "vm-second").original_deleted


async def test_rollback_removes_the_clone_and_its_volumes(
    world: tuple[LibvirtProvider, Any],
) -> None:
    provider, conn = world
    uuid = conn.lookupByName("vm-second").UUIDString()
    await provider.clone("second", active="primary", run="r1")
    await provider.rollback("second")
    back = conn.lookupByName("vm-second")
    assert back.UUIDString() == uuid
    assert back.isActive()
    assert "vm-second-r1-vda.qcow2" not in _volumes(conn)
    with pytest.raises(libvirt.libvirtError):
        back.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lx.NAMESPACE, 0)


async def test_a_node_without_a_machine_gets_one(world: tuple[LibvirtProvider, Any]) -> None:
    provider, conn = world
    dom = conn.lookupByName("vm-third")
    dom.destroy()
    dom.undefine()
    result = await provider.clone("third", active="primary", run="r1")
    assert result.generation is None
    assert conn.lookupByName("vm-third").isActive()
    assert await provider.generation("third") is None
    with pytest.raises(RecloneError, match="no rollback generation"):
        await provider.rollback("third")


async def test_a_missing_active_domain_is_refused(world: tuple[LibvirtProvider, Any]) -> None:
    provider, conn = world
    dom = conn.lookupByName("vm-primary")
    dom.destroy()
    dom.undefine()
    before = libvirt_everything(conn)
    with pytest.raises(RecloneError, match="'vm-primary' is not defined"):
        await provider.clone("second", active="primary", run="r1")
    with pytest.raises(RecloneError, match="'vm-primary' is not defined"):
        await provider.plan("second", active="primary", run="r1")
    assert libvirt_everything(conn) == before


@pytest.mark.parametrize("taken", ["domain", "volume"])
async def test_a_name_the_clone_would_create_is_refused_when_taken(
    world: tuple[LibvirtProvider, Any], taken: str
) -> None:
    provider, conn = world
    if taken == "domain":
        conn.defineXML(
            "<domain type='test'><name>vm-second-orig-r1</name><memory>1024</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        match = "vm-second-orig-r1 already exists"
    else:
        conn.storagePoolLookupByName(POOL).createXML(
            "<volume><name>vm-second-r1-vda.qcow2</name><capacity>1024</capacity></volume>", 0
        )
        match = "vm-second-r1-vda.qcow2 already exists"
    before = libvirt_everything(conn)
    with pytest.raises(RecloneError, match=match):
        await provider.clone("second", active="primary", run="r1")
    assert libvirt_everything(conn) == before


async def test_a_disk_outside_the_pools_is_refused(inspector: Any) -> None:
    populate_libvirt(inspector)
    provider = LibvirtProvider(URI, {"primary": "test", "second": "vm-second"})
    try:  # the driver's own "test" domain has its disk at /guest/diskimage1, in no pool
        with pytest.raises(RecloneError, match="not a volume of a libvirt storage pool"):
            await provider.plan("second", active="primary", run="r1")
    finally:
        await provider.close()


async def test_the_plan_says_what_would_happen(world: tuple[LibvirtProvider, Any]) -> None:
    provider, _ = world
    plan = await provider.plan("second", active="primary", run="r1", delete_original=True)
    text = "\n".join(plan.steps)
    assert "pause vm-primary" in text
    assert f"{POOL}/vm-primary.qcow2" in text
    assert "rename it vm-second-orig-r1" in text
    assert "delete vm-second-orig-r1" in text
    assert plan.summary == {"volumes": 1, "bytes": 20 * 1024 * 1024}
    assert plan.preserved == PRESERVE["second"]


@pytest.mark.parametrize(
    ("domains", "preserve", "match"),
    [
        ({}, {}, "needs the domain"),
        ({"a": "vm", "b": "vm"}, {}, "share domain vm"),
        ({"a": "vm-a"}, {"b": {"hostname": "x"}}, "'b', which has no domain"),
        ({"a": "vm-a"}, {"a": {"root_password": "x"}}, "unknown preserved keys root_password"),
    ],
)
def test_bad_configuration_is_refused(
    domains: dict[str, str], preserve: dict[str, dict[str, str]], match: str
) -> None:
    with pytest.raises(RecloneError, match=match):
        LibvirtProvider(URI, domains, preserve)


async def test_an_unreachable_hypervisor_is_a_clear_error() -> None:
    provider = LibvirtProvider("test:///nonexistent/stead.xml", DOMAINS)
    with pytest.raises(RecloneError, match="cannot connect to libvirt at test:///nonexistent"):
        await provider.generation("second")
    await provider.close()


def test_derive_and_records_round_trip() -> None:
    active = (
        "<domain type='kvm' id='7'><name>a</name><uuid>u</uuid>"
        "<metadata><stead:machine xmlns:stead='urn:x-stead:libvirt:1' role='node'/>"
        "<other xmlns='urn:other'/></metadata>"
        "<os><type>hvm</type><nvram>/var/lib/libvirt/nvram/a_VARS.fd</nvram></os><devices>"
        "<disk type='file' device='disk'><source file='/p/a.img'/><target dev='vda'/>"
        "<backingStore/></disk>"
        "<interface type='network'><mac address='52:54:00:aa:aa:01'/></interface>"
        "<interface type='network'><mac address='52:54:00:aa:aa:02'/></interface>"
        "</devices></domain>"
    )
    xml = lx.derive(
        active,
        name="b",
        volumes={"vda": (lx.VolumeRef("p", "b.img"), "/p/b.img")},
        node_macs=["52:54:00:bb:bb:01"],
    )
    assert "<uuid>" not in xml and "nvram" not in xml and "id=" not in xml
    assert "<name>b</name>" in xml and "urn:other" in xml and lx.NAMESPACE not in xml
    assert lx.macs(xml) == ["52:54:00:bb:bb:01"]  # the second interface gets a new one
    assert lx.disks(xml) == [lx.Disk("vda", "file", path="/p/b.img")]
    record = lx.Record("node", "b", "r1", "a", preserve={"hostname": "b"}, volumes=[])
    assert lx.Record.from_xml(record.to_xml()) == record
    with pytest.raises(RecloneError, match="unknown role"):
        lx.Record.from_xml("<machine role='boss'/>")


def test_without_the_bindings_the_provider_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stead.reclone import providers

    monkeypatch.setitem(sys.modules, "libvirt", None)  # what an absent package looks like
    monkeypatch.delitem(sys.modules, "stead.reclone.providers.libvirt")
    with pytest.raises(RecloneError, match="pip install libvirt-python"):
        providers.libvirt_provider_class()
