"""``python -m stead.lab.ping ADDRESS``: ICMP echo for the lab, without iputils.

Lab tests check reachability with this (``Lab.ping``), inside a node or the client, where
``ping`` may not be installed. ``--interface`` sends through one link (``SO_BINDTODEVICE``),
``--count`` tries that many echoes, each waiting up to ``--timeout`` seconds for its reply.
Exit status 0 on the first reply, 1 when none came or the address is unreachable. Needs root
(a raw socket).

Stdlib only, and no sleeps: every wait is a bounded socket receive.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

ECHO_REQUEST = 8
ECHO_REPLY = 0
PAYLOAD = b"stead-lab-ping"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    csum = checksum(header + PAYLOAD)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, csum, ident, seq) + PAYLOAD


def _is_reply(packet: bytes, ident: int, seq: int) -> bool:
    """Whether a raw IPv4 packet is the echo reply to (ident, seq)."""
    offset = (packet[0] & 0x0F) * 4
    if len(packet) < offset + 8:
        return False
    kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", packet[offset : offset + 8])
    return bool(kind == ECHO_REPLY and got_ident == ident and got_seq == seq)


def ping(
    address: str, *, timeout: float = 1.0, count: int = 1, interface: str | None = None
) -> float | None:
    """Round-trip time in seconds of the first echo answered, or None."""
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        for seq in range(1, count + 1):
            sent = time.monotonic()
            try:
                sock.sendto(echo_request(ident, seq), (address, 0))
            except OSError:  # no route, link down: unreachable, like ping says
                return None
            deadline = sent + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    packet, (source, _) = sock.recvfrom(65535)
                except TimeoutError:
                    break
                if source == address and _is_reply(packet, ident, seq):
                    return time.monotonic() - sent
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stead.lab.ping")
    parser.add_argument("address")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds per echo")
    parser.add_argument("--count", type=int, default=1, help="echoes to try")
    parser.add_argument("--interface", help="send through this link only")
    args = parser.parse_args(argv)
    rtt = ping(args.address, timeout=args.timeout, count=args.count, interface=args.interface)
    if rtt is None:
        print(f"no reply from {args.address}")
        return 1
    print(f"reply from {args.address} in {rtt * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
