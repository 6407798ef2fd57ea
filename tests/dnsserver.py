"""A real authoritative DNS server for tests: BIND's ``named`` on a loopback address.

``Named`` writes a configuration with one primary zone, one TSIG key allowed to update it and
a second key that the server knows but that may not update anything, starts ``named`` in the
foreground on a free port of 127.0.0.1, waits until it answers the zone's SOA (a bounded
loop, never a bare sleep), and stops it with SIGTERM, then SIGKILL. Debian package: ``bind9``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

ADDRESS = "127.0.0.1"
ZONE = "lab.test."
KEY_NAME = "stead-test."
KEY_ALGORITHM = "hmac-sha256"
OTHER_KEY_NAME = "other-key."  # known to the server, but not allowed to update the zone
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

ZONE_FILE = """\
$TTL 300
@       IN SOA  ns.{zone} hostmaster.{zone} 1 3600 600 86400 60
@       IN NS   ns.{zone}
ns      IN A    {address}
"""

CONFIG = """\
options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    session-keyfile "{dir}/session.key";
    managed-keys-directory "{dir}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    notify no;
    dnssec-validation no;
    allow-query {{ any; }};
    allow-transfer {{ none; }};
}};
controls {{ }};
key "{key_name}" {{
    algorithm {key_algorithm};
    secret "{secret}";
}};
key "{other_key_name}" {{
    algorithm {key_algorithm};
    secret "{other_secret}";
}};
zone "{zone}" {{
    type primary;
    file "{dir}/zone.db";
    allow-update {{ key "{key_name}"; }};
}};
"""


def named_binary() -> str | None:
    return shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")


def new_secret() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def free_port(address: str = ADDRESS) -> int:
    """A port free for both UDP and TCP on ``address`` (named binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
        return port
    raise RuntimeError(f"no port free for both UDP and TCP on {address}")


class Named:
    """One ``named`` serving ``ZONE`` in ``directory``; use as a context manager."""

    def __init__(self, directory: Path, *, secret: str | None = None) -> None:
        self.directory = directory
        self.address = ADDRESS
        self.port = 0
        self.secret = secret or new_secret()
        self.other_secret = new_secret()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "named.log"

    def __enter__(self) -> Named:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        binary = named_binary()
        if binary is None:
            raise RuntimeError("named is not installed: apt-get install bind9 (make sysdeps)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.address)
        (self.directory / "zone.db").write_text(
            ZONE_FILE.format(zone=ZONE, address=self.address), encoding="utf-8"
        )
        config = self.directory / "named.conf"
        config.write_text(
            CONFIG.format(
                dir=self.directory,
                port=self.port,
                address=self.address,
                key_name=KEY_NAME,
                key_algorithm=KEY_ALGORITHM,
                secret=self.secret,
                other_key_name=OTHER_KEY_NAME,
                other_secret=self.other_secret,
                zone=ZONE,
            ),
            encoding="utf-8",
        )
        with open(self.log, "wb") as log:
            # -g: foreground, logs on stderr; -4: IPv4 only; -n 1: one worker thread.
            self.process = subprocess.Popen(
                [binary, "-g", "-4", "-n", "1", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"named exited at start:\n{self.log_text()}")
            query = dns.message.make_query(ZONE, dns.rdatatype.SOA)
            query.flags &= ~dns.flags.RD
            with contextlib.suppress(dns.exception.DNSException, OSError):
                answer = dns.query.udp(query, self.address, timeout=0.2, port=self.port)
                if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                    return
            time.sleep(0.05)  # between two probes: the wait itself is bounded above
        raise RuntimeError(f"named did not answer within {START_TIMEOUT} s:\n{self.log_text()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def key_file(self, path: Path, secret: str | None = None) -> Path:
        """Write the base64 secret (ours, or ``secret``) to ``path``, readable by its owner."""
        path.write_text((secret or self.secret) + "\n", encoding="utf-8")
        path.chmod(0o600)
        return path

    def lookup(self, name: str, rdtype: str = "A") -> set[str]:
        """What the server answers for ``name`` (unsigned query, no recursion)."""
        query = dns.message.make_query(name, rdtype)
        query.flags &= ~dns.flags.RD
        answer = dns.query.tcp(query, self.address, timeout=2.0, port=self.port)
        found = answer.get_rrset(
            answer.answer,
            dns.name.from_text(name),
            dns.rdataclass.IN,
            dns.rdatatype.from_text(rdtype),
        )
        return {item.to_text() for item in found} if found is not None else set()
