"""Domain XML for the libvirt provider: reading disks, deriving the new domain, stead metadata.

Pure functions on XML text, so that they are tested without a hypervisor. Domain XML comes
from libvirt itself (ElementTree expands no external entities).

The provider's records live in each domain's ``<metadata>`` under the :data:`NAMESPACE`
namespace (``virDomainSetMetadata``), where libvirt keeps them with the domain definition:

    <machine role="node" node="second" run="R" active-domain="vm-primary"
             original="vm-second-orig-R" original-deleted="no" was-running="yes">
      <preserve key="hostname">second.example</preserve> ...
      <volume pool="default-pool" name="vm-second-R-vda.img"/> ...
    </machine>

``role="node"`` marks a domain a clone made (its volumes are the clone's own);
``role="original"`` marks a rollback generation.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Literal

from stead.errors import RecloneError

NAMESPACE = "urn:x-stead:libvirt:1"
PREFIX = "stead"

Role = Literal["node", "original"]


@dataclass(frozen=True, slots=True)
class Disk:
    """A disk of a domain: its target (``vda``), source kind, and where its data is."""

    target: str
    kind: str  # file, block, volume
    path: str = ""  # file or block
    pool: str = ""  # volume
    volume: str = ""  # volume


@dataclass(frozen=True, slots=True)
class VolumeRef:
    pool: str
    name: str


@dataclass(slots=True)
class Record:
    """What the provider writes into a domain's metadata."""

    role: Role
    node: str
    run: str
    active_domain: str = ""
    original: str = ""
    original_deleted: bool = False
    was_running: bool = False
    preserve: dict[str, str] = field(default_factory=dict)
    volumes: list[VolumeRef] = field(default_factory=list)

    def to_xml(self) -> str:
        root = ET.Element(
            "machine",
            {
                "role": self.role,
                "node": self.node,
                "run": self.run,
                "active-domain": self.active_domain,
                "original": self.original,
                "original-deleted": "yes" if self.original_deleted else "no",
                "was-running": "yes" if self.was_running else "no",
            },
        )
        for key in sorted(self.preserve):
            ET.SubElement(root, "preserve", {"key": key}).text = self.preserve[key]
        for vol in self.volumes:
            ET.SubElement(root, "volume", {"pool": vol.pool, "name": vol.name})
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> Record:
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise RecloneError(f"unreadable stead metadata in a domain: {exc}") from exc
        if root.tag.rpartition("}")[2] != "machine":
            raise RecloneError(f"unexpected stead metadata element <{root.tag}>")
        role: Role
        if root.get("role") == "node":
            role = "node"
        elif root.get("role") == "original":
            role = "original"
        else:
            raise RecloneError(f"stead metadata of unknown role {root.get('role')!r}")
        children = list(root)
        return cls(
            role=role,
            node=root.get("node", ""),
            run=root.get("run", ""),
            active_domain=root.get("active-domain", ""),
            original=root.get("original", ""),
            original_deleted=root.get("original-deleted") == "yes",
            was_running=root.get("was-running") == "yes",
            preserve={
                c.get("key", ""): c.text or ""
                for c in children
                if c.tag.rpartition("}")[2] == "preserve"
            },
            volumes=[
                VolumeRef(c.get("pool", ""), c.get("name", ""))
                for c in children
                if c.tag.rpartition("}")[2] == "volume"
            ],
        )


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise RecloneError(f"libvirt returned unreadable domain XML: {exc}") from exc


def disks(xml: str) -> list[Disk]:
    """The domain's disks (``device="disk"``; CD-ROMs and floppies are shared media)."""
    out = []
    for disk in _parse(xml).iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        source = disk.find("source")
        dev = target.get("dev", "") if target is not None else ""
        kind = disk.get("type", "file")
        if source is None:
            out.append(Disk(dev, kind))
        elif kind == "volume":
            out.append(
                Disk(dev, kind, pool=source.get("pool", ""), volume=source.get("volume", ""))
            )
        else:
            out.append(Disk(dev, kind, path=source.get("file") or source.get("dev") or ""))
    return out


def macs(xml: str) -> list[str]:
    """The MAC addresses of the domain's interfaces, in order."""
    out = []
    for iface in _parse(xml).iterfind("devices/interface"):
        mac = iface.find("mac")
        if mac is not None and mac.get("address"):
            out.append(mac.get("address", ""))
    return out


def derive(
    active_xml: str,
    *,
    name: str,
    volumes: dict[str, tuple[VolumeRef, str]],
    node_macs: list[str],
) -> str:
    """The new domain of a node: the active's definition, made the node's own.

    New name, no UUID (libvirt gives a new one), each disk on its cloned volume (``volumes``:
    target -> (volume, path)), the node's own MAC addresses where it had them (interface by
    interface, in order; libvirt generates the others, so that none is the active's), no
    per-domain NVRAM path (libvirt makes the new domain's own), and none of the active's stead
    metadata.
    """
    root = _parse(active_xml)
    root.attrib.pop("id", None)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for tag in ("uuid", "genid"):
        for el in root.findall(tag):
            root.remove(el)
    os_el = root.find("os")
    if os_el is not None:
        for nvram in os_el.findall("nvram"):
            os_el.remove(nvram)
    metadata = root.find("metadata")
    if metadata is not None:
        for el in list(metadata):
            if el.tag.startswith("{" + NAMESPACE + "}"):
                metadata.remove(el)
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev not in volumes:
            raise RecloneError(f"disk {dev or '?'} of the active has no cloned volume")
        ref, path = volumes[dev]
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        kept = {
            k: v for k, v in source.attrib.items() if k not in ("file", "dev", "pool", "volume")
        }
        source.attrib.clear()
        source.attrib.update(kept)
        if disk.get("type") == "volume":
            source.set("pool", ref.pool)
            source.set("volume", ref.name)
        elif disk.get("type") == "block":
            source.set("dev", path)
        else:
            disk.set("type", "file")
            source.set("file", path)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)  # the clone is a full copy
    for index, iface in enumerate(root.iterfind("devices/interface")):
        for mac in iface.findall("mac"):
            iface.remove(mac)
        if index < len(node_macs):
            iface.insert(0, ET.Element("mac", {"address": node_macs[index]}))
    return ET.tostring(root, encoding="unicode")


def volume_clone(source_xml: str, *, name: str, capacity: int) -> str:
    """The definition of a clone of a volume: same capacity and format, a new name."""
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", {"unit": "bytes"}).text = str(capacity)
    fmt = _parse(source_xml).find("target/format")
    if fmt is not None and fmt.get("type"):
        ET.SubElement(ET.SubElement(root, "target"), "format", {"type": fmt.get("type", "")})
    return ET.tostring(root, encoding="unicode")


def normalised(xml: str) -> str:
    """The definition without what makes a domain itself (name, UUID, MACs, disk sources,
    metadata, runtime ids): two domains are copies of one another when these are equal."""
    root = _parse(xml)
    root.attrib.pop("id", None)
    for tag in ("name", "uuid", "genid", "metadata"):
        for el in root.findall(tag):
            root.remove(el)
    for disk in root.iterfind("devices/disk"):
        disk.attrib.pop("type", None)
        for el in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(el)
    for iface in root.iterfind("devices/interface"):
        for el in iface.findall("mac") + iface.findall("target"):
            iface.remove(el)
    for el in root.iter():
        el.tail = None
        if el.text is not None and not el.text.strip():
            el.text = None
    return ET.tostring(root, encoding="unicode")
