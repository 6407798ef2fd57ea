"""The Linux host backend: the public host name and service addresses of the active node.

``take`` sets the kernel host name (of the agent's own UTS namespace; nothing is written to
``/etc/hostname``), adds each service address to its interface through netlink (in the
agent's network namespace) and announces it: gratuitous ARP requests for IPv4, unsolicited
neighbour advertisements (override flag set) for IPv6, three of each 0.2 s apart, so that
neighbours and switches forget the old active's MAC address at once. IPv6 service addresses
are added without duplicate address detection (``nodad``): during a failover the old active
may still hold the address for a moment, and DAD would leave ours unusable.

``release`` removes exactly the addresses ``take`` added (one that was already on the
interface before ``take`` stays) and puts the previous host name back, if nobody changed it
since. Note that deleting a primary IPv4 address also deletes the secondary addresses of the
same subnet added after it unless ``net.ipv4.conf.IFACE.promote_secondaries`` is set.

All blocking work (netlink, fsync, raw sockets) runs in one worker thread per call, under a
lock: a ``take`` cancelled by a timeout still finishes its thread before a ``release`` starts,
so that the release sees everything the take did.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from stead.config.schema import PublicSection
from stead.errors import IdentityError
from stead.identity.base import BlockingIdentity, StateFile

log = logging.getLogger(__name__)

ANNOUNCE_COUNT = 3  # announcements per address
ANNOUNCE_SPACING = 0.2  # seconds between two of them
ARPHRD_ETHER = 1
IFF_NOARP = 0x80
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LINKADDR = 2
BROADCAST_MAC = b"\xff" * 6
ALL_NODES = "ff02::1"

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class ServiceAddress:
    """One address with its prefix length, on one interface."""

    interface: str
    address: IPInterface

    @classmethod
    def parse(cls, address: str, interface: str) -> ServiceAddress:
        return cls(interface, ipaddress.ip_interface(address))

    def to_json(self) -> dict[str, str]:
        return {"address": str(self.address), "interface": self.interface}

    @classmethod
    def from_json(cls, data: Any) -> ServiceAddress:
        try:
            return cls.parse(str(data["address"]), str(data["interface"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"bad address in the identity state: {data!r}") from exc

    def __str__(self) -> str:
        return f"{self.address} on {self.interface}"


@dataclass(frozen=True)
class _Link:
    index: int
    mac: bytes | None  # None: no Ethernet address, nothing to announce at layer 2


class LinuxHost(BlockingIdentity):
    """Host name and service addresses of this Linux host (see the module docstring).

    The state file holds ``hostname`` (``{"previous": ..., "public": ...}`` or null),
    ``added`` (the addresses this backend added, each recorded before it is added) and
    ``taken`` (true once a take completed).
    """

    __slots__ = ("_hostname", "_lock", "_state", "_stop_announcing", "addresses")

    def __init__(self, public: PublicSection, state_file: Path) -> None:
        self._hostname = public.hostname
        self.addresses = tuple(
            dict.fromkeys(  # without duplicates, in the configured order
                ServiceAddress.parse(item.address, item.interface) for item in public.addresses
            )
        )
        self._state = StateFile(state_file)
        self._lock = threading.Lock()
        self._stop_announcing = threading.Event()

    def describe(self) -> str:
        parts = [f"host name {self._hostname}"] if self._hostname else []
        parts.extend(str(address) for address in self.addresses)
        return ", ".join(parts) or "nothing on this host"

    # The blocking halves, each under the lock.

    def _take(self) -> None:
        with self._lock:
            try:
                links = self._take_locked()
            except Exception as exc:
                self._undo_failed_take(exc)
            log.info("took the public identity: %s", self.describe())
            self._announce_round(links)
            self._start_announcer(links)

    def _undo_failed_take(self, exc: Exception) -> NoReturn:
        """A failed take leaves nothing taken, then raises an IdentityError."""
        try:
            self._release_locked()
        except IdentityError as undo:
            raise IdentityError(f"{exc}; undoing the take failed too: {undo}") from exc
        if isinstance(exc, IdentityError):
            raise exc
        raise IdentityError(f"cannot take {self.describe()}: {exc}") from exc

    def _take_locked(self) -> dict[str, _Link]:
        state = self._state.load() or {"hostname": None, "added": [], "taken": False}
        added = [ServiceAddress.from_json(item) for item in state.get("added", [])]
        with IPRoute() as ipr:
            # Every interface must exist before anything changes.
            links: dict[str, _Link] = {}
            for address in self.addresses:
                found = _link(ipr, address.interface)
                if found is None:
                    raise IdentityError(
                        f"interface {address.interface} does not exist "
                        f"(for the service address {address.address})"
                    )
                links[address.interface] = found
            present = {name: _addresses_on(ipr, link.index) for name, link in links.items()}
            # Addresses we added for an older configuration are ours to remove.
            for address in [a for a in added if a not in self.addresses]:
                _remove(ipr, address, _link(ipr, address.interface))
                added.remove(address)
            planned = [
                address
                for address in self.addresses
                if address not in added and address.address not in present[address.interface]
            ]
            state["added"] = [a.to_json() for a in added + planned]
            state["hostname"] = self._plan_hostname(state.get("hostname"))
            state["taken"] = False
            self._state.save(state)  # before any change: a crash from here on is undone
            if self._hostname and socket.gethostname() != self._hostname:
                _sethostname(self._hostname)
            for address in self.addresses:
                if address.address not in present[address.interface]:
                    _add(ipr, address, links[address.interface])
        state["taken"] = True
        self._state.save(state)
        return links

    def _plan_hostname(self, recorded: Any) -> dict[str, str] | None:
        """The host name record: the name to restore survives any number of takes."""
        if isinstance(recorded, dict) and "previous" in recorded:
            previous = str(recorded["previous"])
            if not self._hostname:  # no public name any more: give the old one back now
                if socket.gethostname() == recorded.get("public"):
                    _sethostname(previous)
                return None
            return {"previous": previous, "public": self._hostname}
        if not self._hostname:
            return None
        return {"previous": socket.gethostname(), "public": self._hostname}

    def _release(self) -> None:
        with self._lock:
            # Under the lock: the announcer sends only under it, after looking at the event.
            self._stop_announcing.set()
            self._release_locked()

    def _release_locked(self) -> None:
        try:
            self._undo_locked()
        except IdentityError:
            raise
        except Exception as exc:  # netlink surprises: still say who failed
            raise IdentityError(f"cannot release {self.describe()}: {exc}") from exc

    def _undo_locked(self) -> None:
        state = self._state.load()
        if state is None:
            return
        added = [ServiceAddress.from_json(item) for item in state.get("added", [])]
        with IPRoute() as ipr:
            for address in reversed(added):
                _remove(ipr, address, _link(ipr, address.interface))
        recorded = state.get("hostname")
        if isinstance(recorded, dict) and "previous" in recorded:
            current = socket.gethostname()
            if current == recorded.get("public"):
                _sethostname(str(recorded["previous"]))
            elif current != recorded["previous"]:
                log.warning(
                    "host name changed to %r since the take; leaving it (was %r before)",
                    current,
                    recorded["previous"],
                )
        self._state.clear()
        if state.get("taken") or added:
            log.info("released the public identity: %s", self.describe())

    def _holds(self) -> bool:
        with self._lock:
            try:
                return self._holds_locked()
            except IdentityError:
                raise
            except Exception as exc:
                raise IdentityError(f"cannot look at {self.describe()}: {exc}") from exc

    def _holds_locked(self) -> bool:
        state = self._state.load()
        if state is None or not state.get("taken"):
            return False
        if self._hostname and socket.gethostname() != self._hostname:
            return False
        with IPRoute() as ipr:
            for address in self.addresses:
                link = _link(ipr, address.interface)
                if link is None or address.address not in _addresses_on(ipr, link.index):
                    return False
        return True

    # Announcements: the first round inside take, the others from a short-lived thread.

    def _start_announcer(self, links: dict[str, _Link]) -> None:
        """Called under the lock, so that a release waiting for it stops this announcer."""
        self._stop_announcing.set()  # one announcer at a time: a second take restarts it
        if ANNOUNCE_COUNT < 2 or not self.addresses:
            return
        self._stop_announcing = stop = threading.Event()
        threading.Thread(
            target=self._announce_later,
            args=(links, stop),
            name="stead-identity-announce",
            daemon=True,
        ).start()

    def _announce_later(self, links: dict[str, _Link], stop: threading.Event) -> None:
        for _ in range(ANNOUNCE_COUNT - 1):
            if stop.wait(ANNOUNCE_SPACING):
                return
            with self._lock:
                if stop.is_set():
                    return
                self._announce_round(links)

    def _announce_round(self, links: dict[str, _Link]) -> None:
        for address in self.addresses:
            link = links.get(address.interface)
            if link is None or link.mac is None:
                continue
            try:
                if isinstance(address.address, ipaddress.IPv4Interface):
                    send_gratuitous_arp(address.interface, link.mac, address.address.ip)
                else:
                    send_unsolicited_na(link.index, link.mac, address.address.ip)
            except OSError as exc:  # the address is in place; the announcement is a courtesy
                log.warning("could not announce %s: %s", address, exc)


def _link(ipr: Any, name: str) -> _Link | None:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        return None
    try:
        (message,) = ipr.get_links(indexes[0])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise IdentityError(f"cannot read interface {name}: {exc}") from exc
    mac_text = message.get_attr("IFLA_ADDRESS")
    if message["ifi_type"] != ARPHRD_ETHER or message["flags"] & IFF_NOARP or not mac_text:
        return _Link(indexes[0], None)
    return _Link(indexes[0], bytes.fromhex(mac_text.replace(":", "")))


def _addresses_on(ipr: Any, index: int) -> set[IPInterface]:
    found: set[IPInterface] = set()
    for message in ipr.get_addr(index=index):
        text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
        if text:
            found.add(ipaddress.ip_interface(f"{text}/{message['prefixlen']}"))
    return found


def _add(ipr: Any, address: ServiceAddress, link: _Link) -> None:
    extra = {"flags": IFA_F_NODAD} if address.address.version == 6 else {}
    try:
        ipr.addr(
            "add",
            index=link.index,
            address=str(address.address.ip),
            prefixlen=address.address.network.prefixlen,
            **extra,
        )
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise IdentityError(f"cannot add {address}: {os.strerror(exc.code)}") from exc


def _remove(ipr: Any, address: ServiceAddress, link: _Link | None) -> None:
    if link is None:  # the interface is gone, and its addresses with it
        return
    try:
        ipr.addr(
            "del",
            index=link.index,
            address=str(address.address.ip),
            prefixlen=address.address.network.prefixlen,
        )
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
            raise IdentityError(f"cannot remove {address}: {os.strerror(exc.code)}") from exc


def _sethostname(name: str) -> None:
    try:
        socket.sethostname(name)
    except OSError as exc:
        raise IdentityError(f"cannot set the host name to {name!r}: {exc}") from exc


def gratuitous_arp_frame(mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request for ``address`` from ``address`` itself (RFC 5227)."""
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        ARPHRD_ETHER,
        ETH_P_IP,
        6,
        4,
        ARPOP_REQUEST,
        mac,
        address.packed,
        bytes(6),
        address.packed,
    )
    frame = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP) + arp
    return frame.ljust(60, b"\0")  # the shortest Ethernet frame, without its checksum


def send_gratuitous_arp(interface: str, mac: bytes, address: ipaddress.IPv4Address) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((interface, 0))
        sock.send(gratuitous_arp_frame(mac, address))


def neighbour_advertisement(mac: bytes, address: ipaddress.IPv6Address) -> bytes:
    """An unsolicited, overriding ICMPv6 neighbour advertisement (the kernel adds the sum)."""
    header = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE)
    option = struct.pack("!BB6s", ND_OPT_TARGET_LINKADDR, 1, mac)
    return header + address.packed + option


def send_unsolicited_na(index: int, mac: bytes, address: ipaddress.IPv6Address) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        # Receivers drop neighbour discovery that crossed a router: hop limit must be 255.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.bind((str(address), 0, 0, index if address.is_link_local else 0))
        sock.sendto(neighbour_advertisement(mac, address), (ALL_NODES, 0, 0, index))
