"""Taking labs apart, including what a crashed run left behind.

Order matters: first the processes (they keep mount namespaces, and with them the loop
mounts, alive), then the network namespaces (their veth pairs go with them; the client's
and the DNS server's too), then the loop devices (normally gone by then: ``mount -o loop``
sets them to clear themselves), last the two bridges. Leftovers are found by naming
convention, not from the state file, which a crash may have left stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from stead.errors import LabError
from stead.lab import dns as labdns
from stead.lab import netns, procs, ssh
from stead.lab.holder import SYSTEM_BINDS

log = logging.getLogger(__name__)

OWNER_FILE = Path("/run/stead-lab/owner")
LOOP_RELEASE_TIMEOUT = 10.0


def owner() -> Path | None:
    """Directory of the lab that last claimed this machine's lab namespaces."""
    try:
        text = OWNER_FILE.read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def claim(lab_dir: Path) -> None:
    OWNER_FILE.parent.mkdir(parents=True, exist_ok=True)
    OWNER_FILE.write_text(f"{lab_dir}\n")


def release(lab_dir: Path | None = None) -> None:
    if lab_dir is None or owner() == lab_dir:
        with contextlib.suppress(FileNotFoundError):
            OWNER_FILE.unlink()


def _release_loops(still_there: Callable[[], list[str]]) -> None:
    """Wait for loop devices to clear themselves; detach the ones that do not."""
    if procs.wait_until(lambda: not still_there(), LOOP_RELEASE_TIMEOUT / 2):
        return
    for dev in still_there():
        log.info("detaching leftover loop device %s", dev)
        netns.run(["losetup", "--detach", dev], check=False)
    if not procs.wait_until(lambda: not still_there(), LOOP_RELEASE_TIMEOUT / 2):
        raise LabError(f"loop devices {still_there()} are still attached (mounted elsewhere?)")


def teardown_node(
    ns: str, veths: Iterable[str], node_dir: Path, holders: Iterable[procs.ProcRef | None]
) -> None:
    """Remove one node: its processes, namespaces, veth pairs and loop devices (those of the
    images under ``node_dir``)."""
    holders = list(holders)
    net = netns.netns_inode(ns)
    mnt = {
        inode
        for ref in holders
        if ref is not None and ref.alive()
        for inode in [procs.ns_inode(ref.pid, "mnt")]
        if inode is not None
    }
    victims = procs.processes_in_namespaces({net} if net is not None else set(), mnt)
    victims += [ref.pid for ref in holders if ref is not None and ref.alive()]
    if victims:
        procs.kill_pids(sorted(set(victims)))
    _remove_veths(veths)
    netns.remove_node_network(ns)
    if netns.loop_devices_under(node_dir):
        _release_loops(lambda: netns.loop_devices_under(node_dir))


def _remove_veths(veths: Iterable[str]) -> None:
    # Deleting a veth takes its peer at once; a namespace's links go asynchronously.
    for veth in veths:
        if veth and netns.link_exists(veth):
            netns.run(["ip", "link", "del", veth], check=False)


def teardown_client() -> None:
    """Remove the client namespace, with whatever still runs in it."""
    _teardown_public_host(netns.client_netns(), netns.client_veth())


def teardown_dns() -> None:
    """Remove the DNS server's namespace, with named (and whatever else runs in it)."""
    _teardown_public_host(netns.dns_netns(), netns.dns_veth())


def _teardown_public_host(ns: str, veth: str) -> None:
    net = netns.netns_inode(ns)
    if net is not None:
        victims = procs.processes_in_namespaces({net}, set())
        if victims:
            procs.kill_pids(victims)
    _remove_veths([veth])
    netns.remove_node_network(ns)


def remove_mount_points() -> list[str]:
    """The empty directories the holders made on the shared root to bind system trees on."""
    removed = []
    for target in SYSTEM_BINDS.values():
        try:
            os.rmdir(target)  # only when empty: never a directory that holds anything
        except OSError:
            continue
        removed.append(f"directory {target}")
    return removed


def sweep_all() -> list[str]:
    """Remove every lab of this machine by naming convention; returns what was removed."""
    removed: list[str] = []
    names = netns.list_netns()
    net = {i for i in (netns.netns_inode(n) for n in names) if i is not None}
    holders = procs.holder_processes()
    mnt = {i for i in (procs.ns_inode(p, "mnt") for p in holders) if i is not None}
    # sshd and named by their configuration too: they outlive a namespace deleted under them.
    own = set(holders) | set(ssh.sshd_processes()) | set(labdns.named_processes())
    victims = sorted(set(procs.processes_in_namespaces(net, mnt)) | own)
    if victims:
        procs.kill_pids(victims)
        removed.append(f"{len(victims)} processes")
    for link in netns.list_lab_links():
        if link not in netns.BRIDGES:
            netns.run(["ip", "link", "del", link], check=False)
            removed.append(f"link {link}")
    for name in names:
        netns.remove_node_network(name)
        removed.append(f"netns {name}")
    loops = netns.lab_loop_devices()
    if loops:
        _release_loops(netns.lab_loop_devices)
        removed += [f"loop {dev}" for dev in loops]
    for bridge in netns.BRIDGES:
        if netns.link_exists(bridge):
            netns.remove_bridge(bridge)
            removed.append(f"bridge {bridge}")
    removed += labdns.remove_client_resolver()
    if ssh.client_hosts_file().exists():
        ssh.remove_client_hosts()
        removed.append(f"file {ssh.client_hosts_file()}")
    netns.clear_drop()
    removed += remove_mount_points()
    release()
    return removed
