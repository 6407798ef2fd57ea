"""The DNS backend: the public name follows the active node, by dynamic update (RFC 2136).

For clusters whose nodes sit in different sites, where no address can move between them,
clients find the active by name. ``take`` replaces the A and AAAA records of the public name
with this node's own public addresses in one update message signed with TSIG (RFC 8945), then
asks the server whether it answers them. ``release`` deletes those records only if they are
still exactly the ones this node set: its update carries RFC 2136 prerequisites ("the A rrset
is exactly ours", "there is no AAAA rrset" when we set none) that the server checks atomically
with the change, so that a late release from a deposed active never removes the records of
the node that took over. Nodes must therefore publish different addresses: DNS cannot tell
apart two nodes that publish the same ones.

Updates go to the zone's primary server over TCP; queries go over UDP (TCP when truncated),
straight to that server, without recursion, signed too. Secondary servers learn the change
through the zone's own NOTIFY and transfer, and resolvers when the old record's TTL (``ttl``,
30 s by default) runs out: clients may keep the old address for that long after a failover.

The TSIG secret lives in a file of its own on each node (``key_file``: the base64 secret, or
a BIND ``key`` clause as ``tsig-keygen`` writes it), read at every use so that a rotated key
is picked up. It never appears in a log line or an error message.

As in the Linux backend, all blocking work runs in one worker thread per call, under a lock,
and the state file records what a take is about to set before the update is sent: a take
cancelled by a timeout finishes its thread before a ``release`` starts, and a new agent after
``kill -9`` releases exactly what its predecessor set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.update

from stead.config.dns import (
    TSIG_ALGORITHMS as TSIG_ALGORITHMS,
)
from stead.config.dns import (
    DnsSection as DnsSection,
)
from stead.config.dns import dns_name, host_name
from stead.config.dns import (
    in_zone as in_zone,
)
from stead.errors import IdentityError, SteadError
from stead.identity.base import BlockingIdentity, StateFile

log = logging.getLogger(__name__)

RECORD_TYPES = ("A", "AAAA")  # IPv4, IPv6
# A prerequisite that failed: the records are no longer the ones this node set.
NOT_OURS = {dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN}
RCODE_HINTS = {
    dns.rcode.REFUSED: "the server does not let key {key} update this name",
    dns.rcode.NOTAUTH: "the server is not the primary of zone {zone}",
    dns.rcode.NOTZONE: "the name is not in zone {zone}",
    dns.rcode.SERVFAIL: "the server could not apply it",
    dns.rcode.NOTIMP: "the server does not accept dynamic updates",
    dns.rcode.FORMERR: "the server did not understand the message",
}
_KEY_SECRET_RE = re.compile(r'\bsecret\s+"([^"]*)"')
_KEY_NAME_RE = re.compile(r'\bkey\s+"?([^"\s{]+)"?\s*\{')
_KEY_ALGORITHM_RE = re.compile(r"\balgorithm\s+\"?([A-Za-z0-9.-]+)\"?\s*;")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(address: str) -> IPAddress:
    """'198.51.100.10' or, as the configuration writes service addresses, '.../24'."""
    try:
        return ipaddress.ip_interface(address.strip()).ip
    except ValueError:
        raise IdentityError(f"{address!r} is not an IP address") from None


def read_tsig_key(section: DnsSection) -> dns.tsig.Key:
    """The TSIG key from ``key_file``; errors name the file, never its content."""
    path = Path(section.key_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise IdentityError(f"cannot read the TSIG key file {path}: {reason}") from None
    found = _KEY_SECRET_RE.search(text)
    if found is not None:  # a BIND key clause: its name and algorithm must be ours
        _check_key_clause(text, section, path)
        encoded = found.group(1)
    else:
        encoded = text
    encoded = "".join(encoded.split())
    try:
        secret = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        secret = b""
    if not secret:
        raise IdentityError(f"the TSIG key file {path} holds no base64 secret")
    return dns.tsig.Key(section.key_name, secret, algorithm=TSIG_ALGORITHMS[section.key_algorithm])


def _check_key_clause(text: str, section: DnsSection, path: Path) -> None:
    named = _KEY_NAME_RE.search(text)
    if named is not None and dns_name(named.group(1), "key") != section.key_name:
        raise IdentityError(
            f"the TSIG key file {path} holds key {named.group(1)}, not {section.key_name}"
        )
    algorithm = _KEY_ALGORITHM_RE.search(text)
    if algorithm is not None:
        found = algorithm.group(1).lower().removesuffix(".sig-alg.reg.int")
        if found != section.key_algorithm:
            raise IdentityError(
                f"the TSIG key file {path} is for {found}, not {section.key_algorithm}"
            )


def _refused(message: str) -> IdentityError:
    """An error after which we know that the server changed nothing."""
    return IdentityError(message, applied=False)


def _nothing_applied(exc: BaseException) -> bool:
    return isinstance(exc, IdentityError) and exc.kwargs.get("applied") is False


def _text(exc: BaseException) -> str:
    if isinstance(exc, SteadError):
        return str(exc.kwargs.get("message") or exc)
    return str(exc)


class _Server:
    """Blocking conversations with the zone's primary server; every failure an IdentityError.

    Each message waits at most ``timeout`` for its answer.
    """

    __slots__ = ("section",)

    def __init__(self, section: DnsSection) -> None:
        self.section = section

    def update(
        self,
        zone: str,
        name: str,
        build: Iterable[tuple[str, Any]],
    ) -> dns.rcode.Rcode:
        """Send one update of ``name`` made of ``build`` (method name, arguments) steps.

        Returns the rcode; raises on anything but an answer of the server.
        """
        message = dns.update.UpdateMessage(zone, keyring=read_tsig_key(self.section))
        for method, arguments in build:
            getattr(message, method)(name, *arguments)
        answer = self._exchange(message, name, "update", tcp=True)
        return answer.rcode()

    def lookup(self, name: str) -> set[IPAddress]:
        """The addresses the server answers for ``name`` (A and AAAA), without recursion."""
        key = read_tsig_key(self.section)
        found: set[IPAddress] = set()
        for rdtype in RECORD_TYPES:
            query = dns.message.make_query(name, rdtype)
            query.flags &= ~dns.flags.RD
            query.use_tsig(key)
            answer = self._exchange(query, name, f"{rdtype} query", tcp=False)
            rcode = answer.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                raise IdentityError(
                    f"DNS server {self.section.where} answered the {rdtype} query for {name} with "
                    f"rcode {dns.rcode.to_text(rcode)}"
                )
            if not answer.flags & dns.flags.AA:
                raise IdentityError(
                    f"DNS server {self.section.where} is not authoritative for {name}"
                )
            rrset = answer.get_rrset(
                answer.answer,
                dns.name.from_text(name),
                dns.rdataclass.IN,
                dns.rdatatype.from_text(rdtype),
            )
            if rrset is not None:
                found.update(ipaddress.ip_address(rdata.to_text()) for rdata in rrset)
        return found

    def _exchange(
        self, message: dns.message.Message, name: str, what: str, *, tcp: bool
    ) -> dns.message.Message:
        section = self.section
        about = f"{what} of {name}" if what == "update" else f"{what} for {name}"
        try:
            if tcp:
                return dns.query.tcp(
                    message, section.server, timeout=section.timeout, port=section.port
                )
            answer, _ = dns.query.udp_with_fallback(
                message, section.server, timeout=section.timeout, port=section.port
            )
            return answer
        except dns.tsig.PeerError as exc:  # the server checked our signature and refused
            raise _refused(
                f"DNS server {section.where} refused the {about}: rcode NOTAUTH, "
                f"{_tsig_reason(exc, section)}"
            ) from None
        except ConnectionRefusedError:
            raise _refused(
                f"DNS server {section.where} refused the connection ({about}): no answer, "
                "is it running?"
            ) from None
        except dns.exception.Timeout:
            raise IdentityError(
                f"DNS server {section.where} did not answer within {section.timeout:g} s "
                f"({about}): no rcode"
            ) from None
        except dns.tsig.BadSignature:
            raise IdentityError(
                f"the answer of DNS server {section.where} ({about}) has a bad TSIG signature"
            ) from None
        except OSError as exc:
            raise IdentityError(
                f"cannot reach DNS server {section.where} ({about}): {exc.strerror or exc}"
            ) from None
        except dns.exception.DNSException as exc:
            raise IdentityError(
                f"bad answer from DNS server {section.where} ({about}): {type(exc).__name__}"
            ) from None


def _tsig_reason(exc: dns.tsig.PeerError, section: DnsSection) -> str:
    if isinstance(exc, dns.tsig.PeerBadKey):
        return f"TSIG BADKEY: the server does not know key {section.key_name}"
    if isinstance(exc, dns.tsig.PeerBadSignature):
        return (
            f"TSIG BADSIG: the secret in {section.key_file} is not the server's for key "
            f"{section.key_name}"
        )
    if isinstance(exc, dns.tsig.PeerBadTime):
        return "TSIG BADTIME: the clocks of this node and of the server differ too much"
    return f"TSIG error ({type(exc).__name__})"


def _rcode_error(section: DnsSection, zone: str, name: str, rcode: dns.rcode.Rcode) -> str:
    hint = RCODE_HINTS.get(rcode, "")
    if hint:
        hint = ": " + hint.format(key=section.key_name, zone=zone)
    return (
        f"DNS server {section.where} refused the update of {name} "
        f"(rcode {dns.rcode.to_text(rcode)}){hint}"
    )


def _by_type(addresses: Iterable[IPAddress]) -> list[tuple[str, list[str]]]:
    """[("A", [IPv4 texts]), ("AAAA", [IPv6 texts])]."""
    found = list(addresses)
    return [
        (rdtype, [str(a) for a in found if a.version == version])
        for rdtype, version in zip(RECORD_TYPES, (4, 6), strict=True)
    ]


def _replace_steps(addresses: Iterable[IPAddress], ttl: int) -> list[tuple[str, Any]]:
    """One update: each of A and AAAA becomes exactly ``addresses`` (or goes away)."""
    steps: list[tuple[str, Any]] = []
    for rdtype, texts in _by_type(addresses):
        steps.append(("replace", (ttl, rdtype, *texts)) if texts else ("delete", (rdtype,)))
    return steps


def _delete_if_ours_steps(addresses: Iterable[IPAddress]) -> list[tuple[str, Any]]:
    """Delete the records only if A and AAAA are exactly what we set (RFC 2136 3.2)."""
    steps: list[tuple[str, Any]] = []
    for rdtype, texts in _by_type(addresses):
        if texts:
            rdataset = dns.rdataset.from_text(dns.rdataclass.IN, rdtype, 0, *texts)
            steps.append(("present", (rdataset,)))  # the rrset exists, with these values
            steps.append(("delete", (rdtype,)))
        else:
            steps.append(("absent", (rdtype,)))  # there is no rrset of this type
    return steps


class DnsIdentity(BlockingIdentity):
    """The public name points at this node's addresses while it is active.

    The state file holds ``zone``, ``name`` and ``addresses`` (what the take sets, recorded
    before the update is sent) and ``taken`` (true once the server answered them). ``holds``
    asks the server (one A and one AAAA query) only when the state says taken, and raises an
    IdentityError when the server cannot be asked.
    """

    __slots__ = ("_lock", "_server", "_state", "addresses", "name", "section")

    def __init__(self, dns: DnsSection, addresses: Sequence[str], state_file: Path) -> None:
        if not dns.public_name:
            raise IdentityError("no public DNS name: set dns.public_name or public.fqdn")
        if not addresses:
            raise IdentityError(f"no address to publish for {dns.public_name}")
        self.section = dns
        self.name = dns.public_name
        self.addresses = tuple(dict.fromkeys(parse_address(a) for a in addresses))
        self._server = _Server(dns)
        self._state = StateFile(state_file)
        self._lock = threading.Lock()

    def describe(self) -> str:
        published = ", ".join(str(address) for address in self.addresses)
        return f"DNS {self.name} -> {published} (server {self.section.where})"

    # The blocking halves, each under the lock.

    def _take(self) -> None:
        with self._lock:
            previous = self._state.load()
            try:
                self._take_locked(previous)
            except Exception as exc:
                self._undo_failed_take(exc, previous)
        log.info("took the public identity: %s", self.describe())

    def _take_locked(self, previous: dict[str, Any] | None) -> None:
        if previous is not None:
            zone, name, addresses = _recorded(previous)
            if name != self.name:  # an older configuration published another name
                self._delete_if_ours(zone, name, addresses)
        self._state.save(self._record(taken=False))  # before the update: a crash is undone
        rcode = self._server.update(
            self.section.zone, self.name, _replace_steps(self.addresses, self.section.ttl)
        )
        if rcode != dns.rcode.NOERROR:
            raise _refused(_rcode_error(self.section, self.section.zone, self.name, rcode))
        answered = self._server.lookup(self.name)
        if answered != set(self.addresses):
            shown = ", ".join(sorted(map(str, answered))) or "nothing"
            raise IdentityError(
                f"DNS server {self.section.where} accepted the update of {self.name} but "
                f"answers {shown} (another update at the same moment, or a CNAME?)"
            )
        self._state.save(self._record(taken=True))

    def _undo_failed_take(self, exc: Exception, previous: dict[str, Any] | None) -> NoReturn:
        """A failed take leaves nothing taken, then raises an IdentityError."""
        nothing_applied = _nothing_applied(exc)
        if nothing_applied and previous is None:
            self._state.clear()  # the server changed nothing, and nothing was held before
        else:
            if nothing_applied and previous is not None:
                self._state.save(previous)  # the server still holds what was recorded before
            try:
                self._release_locked()
            except IdentityError as undo:
                raise IdentityError(
                    f"{_text(exc)}; undoing the take failed too: {_text(undo)}"
                ) from exc
        if isinstance(exc, IdentityError):
            raise exc
        raise IdentityError(f"cannot take {self.describe()}: {exc}") from exc

    def _record(self, *, taken: bool) -> dict[str, Any]:
        return {
            "zone": self.section.zone,
            "name": self.name,
            "addresses": [str(address) for address in self.addresses],
            "taken": taken,
        }

    def _release(self) -> None:
        with self._lock:
            try:
                self._release_locked()
            except IdentityError as exc:
                # DNS advertises the active; it does not fence it. A demotion must not wait
                # for a server it cannot reach: the records stay in the state file, the next
                # release (or the agent's next start) deletes them if they are still ours,
                # and the next active's take replaces them anyway.
                log.error("DNS release of %s left for later: %s", self.name, _text(exc))

    def _release_locked(self) -> None:
        state = self._state.load()
        if state is None:
            return
        zone, name, addresses = _recorded(state)
        self._delete_if_ours(zone, name, addresses)
        self._state.clear()

    def _delete_if_ours(self, zone: str, name: str, addresses: Sequence[IPAddress]) -> bool:
        """Delete what we set at ``name``, unless it changed since; whether it was deleted."""
        rcode = self._server.update(zone, name, _delete_if_ours_steps(addresses))
        published = ", ".join(map(str, addresses))
        if rcode == dns.rcode.NOERROR:
            log.info("released the public identity: DNS %s -> %s", name, published)
            return True
        if rcode in NOT_OURS:
            log.warning(
                "left the records of %s as they are: they are no longer %s (rcode %s), "
                "another node took the name",
                name,
                published,
                dns.rcode.to_text(rcode),
            )
            return False
        raise IdentityError(_rcode_error(self.section, zone, name, rcode))

    def _holds(self) -> bool:
        with self._lock:
            state = self._state.load()
            if state is None or not state.get("taken"):
                return False
            _zone, name, addresses = _recorded(state)
            if name != self.name or set(addresses) != set(self.addresses):
                return False  # taken under another configuration: take again to repair
            return self._server.lookup(self.name) == set(self.addresses)


def _recorded(state: dict[str, Any]) -> tuple[str, str, list[IPAddress]]:
    try:
        zone, name = str(state["zone"]), str(state["name"])
        addresses = [ipaddress.ip_address(str(a)) for a in state["addresses"]]
        dns_name(zone, "zone")
        dns_name(name, "name")
    except (KeyError, TypeError, ValueError) as exc:
        raise IdentityError(f"bad DNS identity state: {exc}") from exc
    return zone, name, addresses


async def register_management(dns: DnsSection, name: str, address: str) -> bool:
    """Make ``name`` (a node's management name) point at ``address``; whether it changed.

    Called at agent start on every node. Only the rrset of the address's family is replaced
    (A for IPv4, AAAA for IPv6): the other family may be managed elsewhere. No update is sent
    when the server already answers exactly this address.
    """
    return await asyncio.to_thread(_register_management, dns, name, address)


def _register_management(section: DnsSection, name: str, address: str) -> bool:
    try:
        fqdn = host_name(name, "management name")
    except ValueError as exc:
        raise IdentityError(str(exc)) from None
    if not in_zone(fqdn, section.zone):
        raise IdentityError(f"management name {fqdn} is not in zone {section.zone}")
    wanted = parse_address(address)
    server = _Server(section)
    family = {a for a in server.lookup(fqdn) if a.version == wanted.version}
    if family == {wanted}:
        return False
    rdtype = RECORD_TYPES[0] if wanted.version == 4 else RECORD_TYPES[1]
    rcode = server.update(section.zone, fqdn, [("replace", (section.ttl, rdtype, str(wanted)))])
    if rcode != dns.rcode.NOERROR:
        raise IdentityError(_rcode_error(section, section.zone, fqdn, rcode))
    answered = {a for a in server.lookup(fqdn) if a.version == wanted.version}
    if answered != {wanted}:
        shown = ", ".join(sorted(map(str, answered))) or "nothing"
        raise IdentityError(
            f"DNS server {section.where} accepted the update of {fqdn} but answers {shown}"
        )
    log.info("management name %s points at %s", fqdn, wanted)
    return True
