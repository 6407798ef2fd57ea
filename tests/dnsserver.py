"""A real authoritative DNS server for tests: BIND's ``named`` on a loopback address.

``Named`` writes a configuration with one primary zone, one TSIG key allowed to update it and
a second key that the server knows but that may not update anything, starts ``named`` in the
foreground on a free port of 127.0.0.1, waits until it answers the zone's SOA (a bounded
loop, never a bare sleep), and stops it with SIGTERM, then SIGKILL. Debian package: ``bind9``.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from pathlib import Path

# The configuration and zone texts are the lab's (its named serves lab.test the same way).
from stead.lab.dns import answers_soa, key_clause, lookup, named_binary, named_conf_text, zone_text

ADDRESS = "127.0.0.1"
ZONE = "lab.test."
KEY_NAME = "stead-test."
KEY_ALGORITHM = "hmac-sha256"
OTHER_KEY_NAME = "other-key."  # known to the server, but not allowed to update the zone
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


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
        zone_file = self.directory / "zone.db"
        zone_file.write_text(zone_text(ZONE, self.address), encoding="utf-8")
        config = self.directory / "named.conf"
        keys = key_clause(KEY_NAME, self.secret, KEY_ALGORITHM)
        keys += key_clause(OTHER_KEY_NAME, self.other_secret, KEY_ALGORITHM)
        config.write_text(
            named_conf_text(
                directory=self.directory,
                address=self.address,
                port=self.port,
                zone=ZONE,
                zone_file=zone_file,
                update_key=KEY_NAME,
                keys=keys,
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
            if answers_soa(self.address, self.port, ZONE):
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
        return lookup(name, rdtype, address=self.address, port=self.port)
