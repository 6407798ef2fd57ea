"""The lab's DNS server: BIND's ``named``, authoritative for ``lab.test``, on the public network.

``named`` runs in a network namespace of its own (``stead-dns``, 198.19.0.3, port 53, one
link on the public bridge), as a zone's primary server would on a real network. It accepts
dynamic updates (RFC 2136) signed with one TSIG key, which ``stead lab up`` generates once
with ``tsig-keygen`` into ``DIR/dns/stead-lab.key``; the same file, a BIND ``key`` clause, is
included by ``named.conf`` and is every agent's ``public.dns.key_file`` (the nodes share the
host's file system, and ``cluster.toml`` is the same on every node). The active agent points
``labsvc.lab.test`` at its own public-network address; every agent points its management
name at its management address when it starts (``stead.identity.dns``).

The client namespace resolves through this server: ``/etc/netns/stead-client/resolv.conf``
(with ``search lab.test``, so that short names work) and an ``nsswitch.conf`` whose hosts
line is ``files dns`` (``ip netns exec`` binds both over ``/etc``). The client's hosts file
keeps the nodes' management names only, which the lab knows without any agent; the public
name comes from DNS alone, so that a client follows it as it follows the role.

The zone file is written once per lab directory; what agents set lives in named's journal
beside it and survives a restart of ``named``, as on a real server. ``named`` is found by
the configuration it was started with (``-c DIR/dns/named.conf``, next to a marker file), so
that ``stead lab down --all`` ends it even when its namespace and state are gone.

Timing duties: ``start_server`` returns once ``named`` answers the zone's SOA (a bounded
wait); ``stop_server`` once it is gone. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from stead.errors import LabError
from stead.lab import netns, procs
from stead.lab.config import LAB_DOMAIN

DNS_PORT = 53
ZONE = f"{LAB_DOMAIN}."
KEY_NAME = "stead-lab"
KEY_ALGORITHM = "hmac-sha256"
# Records the agents set: short, since a failover changes them (the lab's client keeps no
# cache, but a resolver on the way would keep an old answer this long).
TTL = 5
UPDATE_TIMEOUT = 1.0  # a role change waits at most this long per DNS answer
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
MARKER = ".stead-lab-dns"
CONFIG_NAME = "named.conf"
RESOLVER_FILES = ("resolv.conf", "nsswitch.conf")


def named_binary() -> str | None:
    return shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")


@dataclass(frozen=True)
class DnsPaths:
    """The server's files, in ``DIR/dns``."""

    root: Path

    @classmethod
    def of(cls, lab_dir: Path) -> DnsPaths:
        return cls(Path(lab_dir) / netns.DNS)

    @property
    def key(self) -> Path:
        """The TSIG key, as ``tsig-keygen`` writes it: named's and every agent's."""
        return self.root / f"{KEY_NAME}.key"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def zone_file(self) -> Path:
        return self.root / f"{LAB_DOMAIN}.db"

    @property
    def pid_file(self) -> Path:
        return self.root / "named.pid"

    @property
    def log(self) -> Path:
        return self.root / "named.log"

    @property
    def marker(self) -> Path:
        return self.root / MARKER


# -- texts ----------------------------------------------------------------------------------


def _quoted(path: Path | str) -> str:
    text = str(path)
    if '"' in text or "\\" in text:
        raise LabError(f"named cannot take the path {text!r} (a quote or backslash in it)")
    return f'"{text}"'


def key_clause(name: str, secret: str, algorithm: str = KEY_ALGORITHM) -> str:
    """A BIND ``key`` clause, as ``tsig-keygen`` writes it."""
    return f'key "{name}" {{\n\talgorithm {algorithm};\n\tsecret "{secret}";\n}};\n'


def named_conf_text(
    *,
    directory: Path,
    address: str,
    port: int,
    zone: str,
    zone_file: Path,
    update_key: str,
    keys: str,
) -> str:
    """An authoritative-only server of one primary zone that ``update_key`` may update.

    ``keys`` is the text that defines the keys: ``key`` clauses or ``include`` lines.
    No recursion, no transfers, no NOTIFY, no control channel, IPv4 on ``address`` only.
    """
    return f"""\
// Written by Stead: an authoritative server of {zone} that accepts signed updates.
options {{
    directory {_quoted(directory)};
    pid-file {_quoted(directory / "named.pid")};
    session-keyfile {_quoted(directory / "session.key")};
    managed-keys-directory {_quoted(directory)};
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    notify no;
    dnssec-validation no;
    allow-query {{ any; }};
    allow-transfer {{ none; }};
}};
controls {{ }};
{keys.rstrip()}
zone "{zone.rstrip(".")}" {{
    type primary;
    file {_quoted(zone_file)};
    allow-update {{ key "{update_key}"; }};
}};
"""


def zone_text(zone: str, ns_address: str) -> str:
    """The zone as it starts: SOA, NS and the server's own A record; agents add the rest."""
    origin = zone.rstrip(".") + "."
    return f"""\
$TTL 300
@       IN SOA  ns.{origin} hostmaster.{origin} 1 3600 600 86400 60
@       IN NS   ns.{origin}
ns      IN A    {ns_address}
"""


def cluster_settings(lab_dir: Path) -> dict[str, Any]:
    """The lab's ``public.dns`` table (the public name defaults to ``public.fqdn``)."""
    return {
        "server": netns.DNS_ADDRESS,
        "port": DNS_PORT,
        "zone": LAB_DOMAIN,
        "key_name": KEY_NAME,
        "key_algorithm": KEY_ALGORITHM,
        "key_file": str(DnsPaths.of(lab_dir).key),
        "ttl": TTL,
        "timeout": UPDATE_TIMEOUT,
    }


def resolv_conf_text() -> str:
    return (
        "# Written by `stead lab up`: the client asks the lab's DNS server, and only it.\n"
        f"nameserver {netns.DNS_ADDRESS}\n"
        f"search {LAB_DOMAIN}\n"
        "options timeout:1 attempts:2\n"
    )


def nsswitch_text(host_text: str) -> str:
    """The host's ``nsswitch.conf`` with ``hosts: files dns``: no resolver daemon's module
    (systemd-resolved, mDNS) may answer for the client instead of the lab's server."""
    lines = [line for line in host_text.splitlines() if _database(line) != "hosts"]
    if not any(_database(line) == "passwd" for line in lines):
        lines += ["passwd: files", "group: files", "shadow: files"]
    return "\n".join([*lines, "hosts: files dns"]) + "\n"


def _database(line: str) -> str:
    return line.split(":", 1)[0].strip() if ":" in line else ""


# -- the client's resolver ------------------------------------------------------------------


def client_resolver_files() -> dict[str, Path]:
    """What ``ip netns exec stead-client`` binds over ``/etc``, by name."""
    base = Path("/etc/netns") / netns.client_netns()
    return {name: base / name for name in RESOLVER_FILES}


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_client_resolver() -> None:
    files = client_resolver_files()
    try:
        host = Path("/etc/nsswitch.conf").read_text()
    except OSError:
        host = ""
    _write(files["resolv.conf"], resolv_conf_text(), 0o644)
    _write(files["nsswitch.conf"], nsswitch_text(host), 0o644)


def remove_client_resolver() -> list[str]:
    removed = []
    for path in client_resolver_files().values():
        if path.exists():
            path.unlink()
            removed.append(f"file {path}")
        with contextlib.suppress(OSError):  # not empty: the hosts file, or someone else's
            path.parent.rmdir()
    return removed


# -- the server -----------------------------------------------------------------------------


def answers_soa(address: str, port: int, zone: str, timeout: float = 0.2) -> bool:
    """Whether a server at ``address``:``port`` answers ``zone``'s SOA, authoritatively."""
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    query.flags &= ~dns.flags.RD
    try:
        answer = dns.query.udp(query, address, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError):
        return False
    return bool(
        answer.rcode() == dns.rcode.NOERROR and answer.answer and answer.flags & dns.flags.AA
    )


def lookup(
    name: str,
    rdtype: str = "A",
    *,
    address: str = netns.DNS_ADDRESS,
    port: int = DNS_PORT,
    timeout: float = 2.0,
) -> set[str]:
    """What the server answers for ``name`` (unsigned, no recursion, over TCP)."""
    query = dns.message.make_query(name, rdtype)
    query.flags &= ~dns.flags.RD
    try:
        answer = dns.query.tcp(query, address, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError) as exc:
        raise LabError(f"DNS server {address}:{port} did not answer for {name}: {exc}") from None
    found = answer.get_rrset(
        answer.answer,
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
    )
    return {item.to_text() for item in found} if found is not None else set()


def named_processes(lab_dir: str | None = None) -> list[int]:
    """The lab's named (of the lab at ``lab_dir``, or of every lab), found by the
    configuration it was started with, for when its namespace is already gone."""
    found = []
    for pid in procs.pids():
        argv = procs.cmdline(pid)
        if not argv or Path(argv[0]).name != "named" or "-c" not in argv[:-1]:
            continue
        config = Path(argv[argv.index("-c") + 1])
        if config.name != CONFIG_NAME or not (config.parent / MARKER).exists():
            continue
        if lab_dir is None or str(config.parent.parent) == lab_dir:
            found.append(pid)
    return found


def server_pid(lab_dir: Path) -> int | None:
    """The running named of this lab, if any."""
    found = named_processes(str(lab_dir))
    return found[0] if found else None


def server_ok(lab_dir: Path) -> bool:
    """named runs for this lab, in its namespace, and answers."""
    return (
        server_pid(lab_dir) is not None
        and netns.public_host_ok(netns.dns_netns(), netns.dns_veth(), netns.DNS_ADDRESS)
        and answers_soa(netns.DNS_ADDRESS, DNS_PORT, ZONE, timeout=1.0)
    )


def _ensure_key(paths: DnsPaths) -> None:
    if paths.key.exists():
        return
    keygen = shutil.which("tsig-keygen") or shutil.which("tsig-keygen", path="/usr/sbin:/sbin")
    if keygen is None:
        raise LabError("tsig-keygen is missing: install bind9 (`make sysdeps`)")
    text = netns.run([keygen, "-a", KEY_ALGORITHM, KEY_NAME])
    _write(paths.key, text, 0o600)


def prepare(lab_dir: Path, address: str = netns.DNS_ADDRESS, port: int = DNS_PORT) -> DnsPaths:
    """The server's key (generated once), zone file (written once) and configuration."""
    paths = DnsPaths.of(lab_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.marker.touch()
    _ensure_key(paths)
    if not paths.zone_file.exists():
        _write(paths.zone_file, zone_text(ZONE, address), 0o644)
    config = named_conf_text(
        directory=paths.root,
        address=address,
        port=port,
        zone=ZONE,
        zone_file=paths.zone_file,
        update_key=KEY_NAME,
        keys=f"include {_quoted(paths.key)};",
    )
    _write(paths.config, config, 0o644)
    return paths


def start_server(lab_dir: Path) -> int:
    """Start the lab's named in its namespace (made here); wait until it answers.

    The caller removes what an earlier server left (``cleanup.teardown_dns``) first.
    """
    binary = named_binary()
    if binary is None:
        raise LabError("named is missing: install bind9 (`make sysdeps`)")
    paths = prepare(lab_dir)
    check_config(paths.config)
    netns.create_public_host(netns.dns_netns(), netns.dns_veth(), netns.DNS_ADDRESS)
    paths.pid_file.unlink(missing_ok=True)
    with open(paths.log, "ab") as out:
        out.write(b"--- starting named\n")
    # -g: foreground, logging to stderr (the log file); -4: IPv4 only; -n 1: one worker.
    argv = ["ip", "netns", "exec", netns.dns_netns()]
    argv += [binary, "-g", "-4", "-n", "1", "-c", str(paths.config)]
    procs.spawn_detached(argv, log_path=paths.log)

    def answering() -> bool:
        if not paths.pid_file.exists() and server_pid(lab_dir) is None:
            return False
        return answers_soa(netns.DNS_ADDRESS, DNS_PORT, ZONE)

    if not procs.wait_until(answering, START_TIMEOUT, interval=0.05):
        raise LabError(
            f"named did not answer on {netns.DNS_ADDRESS}:{DNS_PORT} within "
            f"{START_TIMEOUT:.0f} s; see {paths.log}:\n{_tail(paths.log)}"
        )
    pid = server_pid(lab_dir)
    if pid is None:
        raise LabError(f"named exited at once; see {paths.log}")
    return pid


def stop_server(lab_dir: Path) -> None:
    """SIGTERM the lab's named (it writes its journal), SIGKILL it after ``STOP_TIMEOUT``."""
    found = named_processes(str(lab_dir))
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not procs.wait_until(
        lambda: not any(procs.start_time(p) is not None and not procs.is_zombie(p) for p in found),
        STOP_TIMEOUT,
    ):
        procs.kill_pids(found)


def describe(lab_dir: Path) -> dict[str, Any]:
    """The server, for ``stead lab status --json``."""
    paths = DnsPaths.of(lab_dir)
    pid = server_pid(lab_dir)
    return {
        "address": netns.DNS_ADDRESS,
        "port": DNS_PORT,
        "zone": LAB_DOMAIN,
        "netns": netns.dns_netns(),
        "veth": netns.dns_veth(),
        "key_name": KEY_NAME,
        "key_file": str(paths.key),
        "config": str(paths.config),
        "log": str(paths.log),
        "pid": pid,
        "alive": pid is not None,
        "client_resolv_conf": str(client_resolver_files()["resolv.conf"]),
    }


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def check_config(config: Path) -> None:
    """``named-checkconf``: a clear error before starting, if the tool is there."""
    checker = shutil.which("named-checkconf") or shutil.which(
        "named-checkconf", path="/usr/sbin:/usr/bin:/sbin"
    )
    if checker is None:
        return
    proc = subprocess.run([checker, str(config)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"named-checkconf refused {config}: {(proc.stderr or proc.stdout).strip()}")
