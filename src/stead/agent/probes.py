"""Probes the decision cycle needs: witness targets and the public address.

Witnesses (``failover.witnesses``) tell a node whether it is on the network at all: an ICMP
echo ("IP") or a TCP connect ("IP:PORT"), for example to the gateway. The public probe tells
a passive whether an agent still answers on the public service address: a TLS handshake
with the cluster CA on the channel port there. A frozen or dead agent does not finish a
handshake, even while its kernel still answers pings, so the probe sees the agent, not the
machine.

Timing duties: each round of probes is bounded by ``timeout``; results carry the monotonic
time they were taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

import icmplib

from stead.channel.transport import connect
from stead.config.schema import parse_witness
from stead.errors import AuthenticationError, SteadError

log = logging.getLogger(__name__)


async def probe_witness(target: str, timeout: float) -> bool:
    """True when the witness answers within ``timeout``."""
    host, port = parse_witness(target)
    if port is not None:
        try:
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    try:
        result = await icmplib.async_ping(host, count=1, timeout=timeout, privileged=True)
    except (icmplib.ICMPLibError, OSError) as exc:
        log.debug("witness %s: %s", target, exc)
        return False
    return bool(result.is_alive)


class WitnessMonitor:
    """Probes every witness each ``interval``; ``ok`` is None when none is configured."""

    def __init__(self, witnesses: list[str], interval: float) -> None:
        self.witnesses = witnesses
        self.interval = interval
        self.ok: bool | None = None if not witnesses else True
        self.lost_since: float | None = None
        self.results: dict[str, bool] = {}
        self.rounds = 0

    async def run(self) -> None:
        if not self.witnesses:
            return
        timeout = max(0.1, self.interval)
        while True:
            started = time.monotonic()
            results = await asyncio.gather(*(probe_witness(t, timeout) for t in self.witnesses))
            self.results = dict(zip(self.witnesses, results, strict=True))
            self.rounds += 1
            if any(results):
                self.ok, self.lost_since = True, None
            else:
                if self.lost_since is None:
                    self.lost_since = started
                    log.warning("no witness answers (%s)", ", ".join(self.witnesses))
                self.ok = False
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))


async def agent_answers(
    address: str, port: int, ctx: ssl.SSLContext, expect: str, timeout: float
) -> bool:
    """True when a Stead agent completes a TLS handshake on ``address``:``port``.

    A node of the cluster other than ``expect`` answering counts too: someone holds the
    public address. Silence, a refused connection or a timeout count as nobody.
    """
    try:
        conn = await connect(address, port, ctx, expected_peer=expect, timeout=timeout)
    except AuthenticationError:
        return True
    except (SteadError, OSError, TimeoutError, ssl.SSLError):
        return False
    await conn.close()
    return True
