"""The libvirt provider: a node is rebuilt as a clone of the active's virtual machine.

Each node runs in a libvirt domain (``domains``: node name -> domain name). A clone of node N
from the active A, for run R:

1. Checks: both domains known, A's domain defined, every disk of A a volume of a libvirt
   storage pool, and none of the names the run creates taken.
2. A's disks are cloned (``virStorageVolCreateXMLFrom``) to ``<N's domain>-R-<target>`` in
   their pools, while A is paused, so that the copies are consistent with one another. With
   copy-on-write storage (qcow2 on a reflink file system, LVM thin, ZFS, RBD) this is short.
   A disk-only external snapshot with a block commit afterwards would remove the pause on
   QEMU; the test driver cannot take one, so it is left for when it can be tested.
3. N's domain, if it exists, is shut down (gracefully, then forced after
   ``shutdown_timeout``) and renamed ``<N's domain>-orig-R``: the rollback generation.
4. N's domain is defined anew from A's definition (:func:`libvirt_xml.derive`): new UUID,
   the cloned volumes, N's own MAC addresses, and N's preserved configuration in its stead
   metadata. ``customize``, when given, writes that configuration into the guest's disks
   (virt-customize, a cloud-init seed); without it the metadata is the record, and the
   guest reads it from there or the operator's tooling applies it.
5. The new domain is started; older generations of N are deleted; with ``delete_original``
   this run's generation is deleted too (the domain and its volumes).

A failure in steps 2 to 5 undoes what the run did: the new domain and volumes go, the
original gets its name back and is started again if it was running. A is resumed whatever
happens.

Timing: every libvirt call is blocking and runs in a worker thread, one at a time (libvirt
connections are thread-safe, but the provider's steps must not interleave). The connection
is opened on first use and kept until :meth:`LibvirtProvider.close`.

Tested against libvirt's own test driver (``test:///default``, in-process in the client
library, no daemon): its volumes hold no data and its domains run nothing, but definitions,
renames, metadata, pools and volume clones are libvirt's real code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import libvirt

from stead.config.reclone import LIBVIRT_PRESERVE_KEYS
from stead.errors import RecloneError
from stead.reclone.providers import libvirt_xml as lx
from stead.reclone.providers.base import (
    CloneProvider,
    CloneResult,
    Generation,
    Progress,
    ProviderPlan,
    check_node,
    check_pair,
    no_progress,
)

log = logging.getLogger(__name__)

PRESERVE_KEYS = LIBVIRT_PRESERVE_KEYS
"""What a node keeps. ``node_key`` is a reference (a path or a fingerprint), never a key."""

Customize = Callable[[str, list[str], Mapping[str, str]], None]
"""Called with the new domain's name, its disk paths and the preserved configuration, after
the domain is defined and before it starts (in the worker thread)."""

T = TypeVar("T")

_METADATA = libvirt.VIR_DOMAIN_METADATA_ELEMENT
_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE
_SHUTDOWN_POLL = 0.2


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error on stderr; ours are raised instead."""


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


class LibvirtProvider(CloneProvider):
    """Clones the active's domain into a node's; see the module docstring for the steps."""

    __slots__ = (
        "_conn",
        "_lock",
        "connect",
        "customize",
        "domains",
        "preserve",
        "shutdown_timeout",
        "uri",
    )
    name = "libvirt"

    def __init__(
        self,
        uri: str,
        domains: Mapping[str, str],
        preserve: Mapping[str, Mapping[str, str]] | None = None,
        *,
        shutdown_timeout: float = 60.0,
        customize: Customize | None = None,
        connect: Callable[[str], Any] = libvirt.open,
    ) -> None:
        if not domains:
            raise RecloneError("the libvirt provider needs the domain of every node")
        by_domain: dict[str, str] = {}
        for node, domain in domains.items():
            if not domain or "/" in domain:
                raise RecloneError(f"node {node}: {domain!r} is not a domain name")
            if domain in by_domain:
                raise RecloneError(f"nodes {by_domain[domain]} and {node} share domain {domain}")
            by_domain[domain] = node
        preserve = dict(preserve or {})
        for node, values in preserve.items():
            if node not in domains:
                raise RecloneError(f"preserved configuration for {node!r}, which has no domain")
            unknown = sorted(set(values) - set(PRESERVE_KEYS))
            if unknown:
                raise RecloneError(
                    f"node {node}: unknown preserved keys {', '.join(unknown)} "
                    f"(known: {', '.join(PRESERVE_KEYS)})"
                )
        self.uri = uri
        self.domains = dict(domains)
        self.preserve = {node: dict(values) for node, values in preserve.items()}
        self.shutdown_timeout = shutdown_timeout
        self.customize = customize
        self.connect = connect
        self._conn: Any = None
        self._lock = threading.Lock()

    # -- the seam --------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        return list(self.domains)

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "uri": self.uri, "domains": dict(self.domains)}

    async def plan(
        self, node: str, *, active: str, run: str, delete_original: bool = False
    ) -> ProviderPlan:
        check_pair(self.nodes(), node, active)
        return await self._call(self._plan, node, active, run, delete_original)

    async def clone(
        self,
        node: str,
        *,
        active: str,
        run: str,
        delete_original: bool = False,
        progress: Progress = no_progress,
    ) -> CloneResult:
        check_pair(self.nodes(), node, active)
        loop = asyncio.get_running_loop()

        def report(update: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(progress, {**update, "node": node})

        return await self._call(self._clone, node, active, run, delete_original, report)

    async def rollback(self, node: str) -> Generation:
        check_node(self.nodes(), node)
        return await self._call(self._rollback, node)

    async def delete_original(self, node: str) -> None:
        check_node(self.nodes(), node)
        await self._call(self._delete_original, node)

    async def generation(self, node: str) -> Generation | None:
        check_node(self.nodes(), node)
        return await self._call(self._generation, node)

    async def preserved(self, node: str) -> dict[str, str]:
        check_node(self.nodes(), node)
        return await self._call(self._preserved, node)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    # -- plumbing --------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            try:
                return fn(*args)
            except libvirt.libvirtError as exc:
                raise RecloneError(f"libvirt ({self.uri}): {_message(exc)}") from exc

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    @property
    def conn(self) -> Any:
        if self._conn is None:
            libvirt.registerErrorHandler(_quiet, None)
            try:
                self._conn = self.connect(self.uri)
            except libvirt.libvirtError as exc:
                reason = _message(exc)
                raise RecloneError(f"cannot connect to libvirt at {self.uri}: {reason}") from exc
        return self._conn

    def _domain(self, name: str) -> Any | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _record(self, dom: Any) -> lx.Record | None:
        try:
            text = dom.metadata(_METADATA, lx.NAMESPACE, _CONFIG)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise
        return lx.Record.from_xml(text)

    def _set_record(self, dom: Any, record: lx.Record | None) -> None:
        text = record.to_xml() if record is not None else None
        dom.setMetadata(_METADATA, text, lx.PREFIX, lx.NAMESPACE, _CONFIG)

    def _volume(self, disk: lx.Disk, domain: str) -> Any:
        """The storage volume behind a disk (refused unless it is in a pool)."""
        try:
            if disk.kind == "volume":
                return self.conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(
                    disk.volume
                )
            if disk.path:
                return self.conn.storageVolLookupByPath(disk.path)
        except libvirt.libvirtError as exc:
            if _code(exc) not in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise
        where = f"{disk.pool}/{disk.volume}" if disk.kind == "volume" else disk.path or "no source"
        raise RecloneError(
            f"disk {disk.target} of {domain} ({where}) is not a volume of a libvirt storage "
            "pool; the libvirt provider clones pool volumes only"
        )

    def _generations(self, node: str) -> list[tuple[Any, lx.Record]]:
        found = []
        for dom in self.conn.listAllDomains(0):
            record = self._record(dom)
            if record is not None and record.role == "original" and record.node == node:
                found.append((dom, record))
        return sorted(found, key=lambda pair: pair[1].run)

    def _stop(self, dom: Any) -> None:
        if not dom.isActive():
            return
        with contextlib.suppress(libvirt.libvirtError):
            dom.shutdown()
        deadline = time.monotonic() + self.shutdown_timeout
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(_SHUTDOWN_POLL)
        if dom.isActive():
            log.warning("reclone: %s did not shut down in time; forcing it off", dom.name())
            dom.destroy()

    def _disk_users(self, skip: str) -> set[str]:
        """Every disk path or volume of every domain but ``skip``."""
        used: set[str] = set()
        for dom in self.conn.listAllDomains(0):
            if dom.name() == skip:
                continue
            for disk in lx.disks(dom.XMLDesc(_INACTIVE)):
                used.add(disk.path or f"{disk.pool}/{disk.volume}")
        return used

    def _remove_domain(self, dom: Any) -> None:
        """Undefine a domain and delete the pool volumes that no other domain uses."""
        name = dom.name()
        xml = dom.XMLDesc(_INACTIVE)
        vols = []
        for disk in lx.disks(xml):
            with contextlib.suppress(RecloneError):
                vols.append(self._volume(disk, name))
        used = self._disk_users(skip=name)
        if dom.isActive():
            dom.destroy()
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        if "<nvram" in xml:
            flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        dom.undefineFlags(flags)
        for vol in vols:
            pool = vol.storagePoolLookupByVolume()
            if vol.path() in used or f"{pool.name()}/{vol.name()}" in used:
                log.warning("reclone: volume %s kept: another domain uses it", vol.path())
                continue
            vol.delete(0)

    @contextlib.contextmanager
    def _frozen(self, dom: Any) -> Iterator[str]:
        """The active's disks hold still: paused while they are copied, resumed always."""
        state = dom.state()[0]
        if state != libvirt.VIR_DOMAIN_RUNNING:
            yield "not running"
            return
        dom.suspend()
        try:
            yield "paused"
        finally:
            dom.resume()

    # -- the steps, in the worker thread ----------------------------------------------------

    def _prepare(self, node: str, active: str, run: str) -> dict[str, Any]:
        """Everything a clone needs, checked; changes nothing."""
        active_name, node_name = self.domains[active], self.domains[node]
        source = self._domain(active_name)
        if source is None:
            raise RecloneError(f"the active's domain {active_name!r} is not defined at {self.uri}")
        original = self._domain(node_name)
        if original is not None:
            record = self._record(original)
            if record is not None and record.role == "original":
                raise RecloneError(f"domain {node_name} is a rollback generation, not a node")
        keep_as = f"{node_name}-orig-{run}"
        if self._domain(keep_as) is not None:
            raise RecloneError(f"domain {keep_as} already exists (run id {run} reused?)")
        source_xml = source.XMLDesc(_INACTIVE)
        clones = []
        for disk in lx.disks(source_xml):
            vol = self._volume(disk, active_name)
            pool = vol.storagePoolLookupByVolume()
            ext = posixpath.splitext(vol.name())[1]
            new_name = f"{node_name}-{run}-{disk.target}{ext}"
            if new_name in pool.listVolumes():
                raise RecloneError(f"volume {pool.name()}/{new_name} already exists")
            clones.append((disk, vol, pool, new_name))
        return {
            "source": source,
            "source_xml": source_xml,
            "original": original,
            "keep_as": keep_as,
            "clones": clones,
            "preserve": self._preserved(node),
        }

    def _plan(self, node: str, active: str, run: str, delete_original: bool) -> ProviderPlan:
        prep = self._prepare(node, active, run)
        active_name, node_name = self.domains[active], self.domains[node]
        steps = [f"pause {active_name} while its disks are cloned"]
        total = 0
        for disk, vol, pool, new_name in prep["clones"]:
            capacity = int(vol.info()[1])
            total += capacity
            steps.append(
                f"clone {pool.name()}/{vol.name()} ({disk.target}, {capacity} bytes) "
                f"to {pool.name()}/{new_name}"
            )
        if prep["original"] is not None:
            steps.append(f"shut down {node_name} and rename it {prep['keep_as']}")
        else:
            steps.append(f"{node_name} is not defined: there is no original to keep")
        kept = ", ".join(f"{k}={v}" for k, v in sorted(prep["preserve"].items()))
        steps.append(f"define {node_name} from {active_name}'s definition, keeping {kept}")
        steps.append(f"start {node_name}")
        if prep["original"] is not None:
            steps.append(
                f"delete {prep['keep_as']} and its volumes"
                if delete_original
                else f"keep {prep['keep_as']} as the rollback generation"
            )
        return ProviderPlan(
            provider=self.name,
            node=node,
            active=active,
            steps=steps,
            summary={"volumes": len(prep["clones"]), "bytes": total},
            preserved=prep["preserve"],
        )

    def _clone(
        self,
        node: str,
        active: str,
        run: str,
        delete_original: bool,
        report: Callable[[dict[str, Any]], None],
    ) -> CloneResult:
        prep = self._prepare(node, active, run)
        active_name, node_name, keep_as = self.domains[active], self.domains[node], prep["keep_as"]
        original, preserve = prep["original"], prep["preserve"]
        created: list[Any] = []
        renamed: Any = None
        new: Any = None
        was_running = False
        try:
            report({"phase": "copy", "volumes": len(prep["clones"])})
            volumes: dict[str, tuple[lx.VolumeRef, str]] = {}
            with self._frozen(prep["source"]) as how:
                for disk, vol, pool, new_name in prep["clones"]:
                    created.append(self._clone_volume(vol, pool, new_name))
                    volumes[disk.target] = (lx.VolumeRef(pool.name(), new_name), created[-1].path())
            log.info(
                "reclone %s: %d volumes of %s cloned (%s)", run, len(created), active_name, how
            )
            report({"phase": "replace"})
            if original is not None:
                was_running = bool(original.isActive())
                self._stop(original)
                original.rename(keep_as, 0)
                renamed = self._domain(keep_as)
                record = lx.Record("original", node, run, active_name, was_running=was_running)
                self._set_record(renamed, record)
            macs = lx.macs(original.XMLDesc(_INACTIVE)) if original is not None else []
            xml = lx.derive(prep["source_xml"], name=node_name, volumes=volumes, node_macs=macs)
            new = self.conn.defineXML(xml)
            refs = [ref for ref, _ in volumes.values()]
            mine = lx.Record(
                "node",
                node,
                run,
                active_name,
                original=keep_as if renamed is not None else "",
                preserve=preserve,
                volumes=refs,
            )
            self._set_record(new, mine)
            if self.customize is not None:
                self._customize(node_name, [path for _, path in volumes.values()], preserve)
            report({"phase": "start"})
            new.create()
        except BaseException:
            self._undo(node_name, new, renamed, was_running, created)
            raise
        if renamed is not None:  # one generation per node: the newest
            for dom, _ in self._generations(node):
                if dom.name() != keep_as:
                    log.info("reclone %s: older generation %s deleted", run, dom.name())
                    self._remove_domain(dom)
        if delete_original and renamed is not None:
            self._remove_domain(renamed)
            mine.original_deleted = True
            self._set_record(new, mine)
        report({"phase": "done"})
        kept = None
        if renamed is not None:
            detail = "" if delete_original else keep_as
            kept = Generation(node, run, deleted=delete_original, detail=detail)
        return CloneResult(
            provider=self.name,
            node=node,
            active=active,
            run=run,
            generation=kept,
            summary={"volumes": len(created), "domain": node_name},
            preserved=preserve,
        )

    def _customize(self, domain: str, paths: list[str], preserve: dict[str, str]) -> None:
        assert self.customize is not None
        try:
            self.customize(domain, paths, preserve)
        except (RecloneError, libvirt.libvirtError):
            raise
        except Exception as exc:
            raise RecloneError(f"giving {domain} its configuration failed: {exc}") from exc

    def _clone_volume(self, vol: Any, pool: Any, name: str) -> Any:
        xml = lx.volume_clone(vol.XMLDesc(0), name=name, capacity=int(vol.info()[1]))
        return pool.createXMLFrom(xml, vol, 0)

    def _undo(
        self, node_name: str, new: Any, renamed: Any, was_running: bool, created: list[Any]
    ) -> None:
        """Put things back after a failed clone; every step is tried, failures logged."""
        steps: list[tuple[str, Callable[[], object]]] = []
        if new is not None:
            steps.append(("remove the new domain", lambda: self._undefine_only(new)))
        if renamed is not None:
            steps.append(("rename the original back", lambda: renamed.rename(node_name, 0)))
            steps.append(("clear its record", lambda: self._set_record(renamed, None)))
            if was_running:
                steps.append(("start the original", renamed.create))
        steps.extend((f"delete volume {vol.name()}", vol.delete) for vol in created)
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                log.error("reclone undo: cannot %s: %s", what, exc)

    def _undefine_only(self, dom: Any) -> None:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def _rollback(self, node: str) -> Generation:
        node_name = self.domains[node]
        current = self._domain(node_name)
        record = self._record(current) if current is not None else None
        generations = self._generations(node)
        if not generations:
            if record is not None and record.role == "node" and record.original_deleted:
                raise RecloneError(
                    f"the original machine of {node} (reclone {record.run}) was deleted; "
                    "there is nothing to roll back to"
                )
            raise RecloneError(f"{node} has no rollback generation")
        original, kept = generations[-1]
        if current is not None:
            if record is None or record.role != "node":
                raise RecloneError(
                    f"domain {node_name} was not made by a reclone; refusing to replace it"
                )
            self._remove_domain(current)
        keep_as = original.name()
        original.rename(node_name, 0)
        restored = self.conn.lookupByName(node_name)
        self._set_record(restored, None)
        if kept.was_running:
            restored.create()
        log.info("reclone %s of %s rolled back: %s is back", kept.run, node, node_name)
        return Generation(node, kept.run, detail=keep_as)

    def _delete_original(self, node: str) -> None:
        generations = self._generations(node)
        for dom, _ in generations:
            self._remove_domain(dom)
        current = self._domain(self.domains[node])
        mine = self._record(current) if current is not None else None
        if generations and mine is not None and mine.role == "node":
            mine.original_deleted = True
            self._set_record(current, mine)

    def _generation(self, node: str) -> Generation | None:
        generations = self._generations(node)
        if generations:
            dom, kept = generations[-1]
            return Generation(node, kept.run, detail=dom.name())
        current = self._domain(self.domains[node])
        record = self._record(current) if current is not None else None
        if record is not None and record.role == "node" and record.original_deleted:
            return Generation(node, record.run, deleted=True)
        return None

    def _preserved(self, node: str) -> dict[str, str]:
        """Configured values over those recorded with the node's domain; host name defaults
        to the node name."""
        values = {"hostname": node}
        current = self._domain(self.domains[node])
        record = self._record(current) if current is not None else None
        if record is not None and record.role == "node":
            values.update(record.preserve)
        values.update(self.preserve.get(node, {}))
        return values
