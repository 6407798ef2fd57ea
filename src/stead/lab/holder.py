"""The holder: one long-lived process per lab node that keeps the node's namespaces alive.

Started as ``ip netns exec stead-NODE unshare --mount --uts --propagation private -- python -m
stead.lab.holder ...``, it sets the node's host name, loop-mounts the node's disk image on the
protected path and then waits. Every command for the node enters the holder's namespaces
(``nsenter -t PID -m -u -n``). It writes its pid file only once the node is ready, or a
``.failed`` file with the reason, so its starter never has to guess.

Stdlib only: it runs before anything else of the node exists.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stead.lab.holder")
    parser.add_argument("--lab-dir", required=True, help="marks the process as this lab's")
    parser.add_argument("--node", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    pid_file = Path(args.pid_file)
    failed = pid_file.with_suffix(".failed")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        socket.sethostname(args.node)
        os.makedirs(args.mountpoint, exist_ok=True)
        # noinit_itable: the kernel would otherwise zero every inode table in the background,
        # turning the sparse image into gigabytes of real writes.
        subprocess.run(
            ["mount", "-o", "loop,noinit_itable", args.image, args.mountpoint],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        _write_atomic(failed, f"{args.node}: {detail.strip()}\n")
        print(f"holder {args.node}: {detail.strip()}", file=sys.stderr)
        return 1
    _write_atomic(pid_file, f"{os.getpid()}\n")
    print(f"holder {args.node}: ready, pid {os.getpid()}", file=sys.stderr, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
