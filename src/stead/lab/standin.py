"""A stand-in for the agent, for lab tests that must not depend on the real one.

``python -m stead.lab.standin --socket PATH [--echo-port 7700]`` listens on the agent's Unix
socket (answering every connection with one line, ``standin NODE``) and runs a TCP echo
server on every address of the node, so that tests can check readiness and connectivity.
Use it with ``STEAD_LAB_AGENT_CMD="python -m stead.lab.standin --socket {socket}"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys

ECHO_PORT = 7700


async def _serve(socket_path: str, echo_port: int) -> None:
    name = socket.gethostname()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"standin {name}\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    unix = await asyncio.start_unix_server(answer, path=socket_path)
    tcp = await asyncio.start_server(echo, host="0.0.0.0", port=echo_port)
    print(f"standin {name}: ready on {socket_path} and tcp/{echo_port}", flush=True)
    async with unix, tcp:
        await asyncio.gather(unix.serve_forever(), tcp.serve_forever())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stead.lab.standin")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--echo-port", type=int, default=ECHO_PORT)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.socket, args.echo_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
