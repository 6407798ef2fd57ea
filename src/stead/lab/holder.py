"""The holder: one long-lived process per lab node that keeps the node's namespaces alive.

Started as ``ip netns exec stead-NODE unshare --mount --uts --propagation private -- python -m
stead.lab.holder ...``, it sets the node's host name, loop-mounts the node's disk image on the
protected path, loop-mounts the node's system image and binds its trees (``/opt/lab``,
``/etc/lab``, and a package database of the node's own on ``/var/lib/dpkg``), then waits.
Every command for the node enters the holder's namespaces (``nsenter -t PID -m -u -n``). It
writes its pid file only once the node is ready, or a ``.failed`` file with the reason, so
its starter never has to guess.

Stdlib only: it runs before anything else of the node exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# The node's system image: directory in the image -> where the node sees it.
SYSTEM_BINDS = {"opt": "/opt/lab", "etc": "/etc/lab", "dpkg": "/var/lib/dpkg"}


def _seed_system(mount: Path, node: str) -> None:
    """First mount of a node's system image: trees alike on every node, but for what each
    node keeps as its own (``/etc/lab/node.conf``), and a copy of the host's dpkg database."""
    if (mount / ".seeded").exists():
        return
    (mount / "opt" / "app" / "bin").mkdir(parents=True, exist_ok=True)
    (mount / "opt" / "app" / "VERSION").write_text("1.0\n")
    tool = mount / "opt" / "app" / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho lab tool 1.0\n")
    tool.chmod(0o755)
    (mount / "etc").mkdir(exist_ok=True)
    (mount / "etc" / "app.conf").write_text("[app]\nlisten = 8080\n")
    (mount / "etc" / "node.conf").write_text(f"node = {node}\n")
    if os.path.isdir("/var/lib/dpkg"):
        _copy_live_tree("/var/lib/dpkg", mount / "dpkg")
    else:
        (mount / "dpkg").mkdir(exist_ok=True)
    _write_atomic(mount / ".seeded", "1\n")


def _copy_live_tree(source: str, target: Path) -> None:
    """Copy a directory that may change meanwhile (apt running on the host): a file that
    vanishes between listing and copying is left out, any other failure is raised."""
    try:
        shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    except shutil.Error as exc:
        real = [e for e in exc.args[0] if "No such file" not in str(e[2])]
        if real:
            raise OSError(f"copying {source}: {real[:3]}") from None


def _mount_image(image: str, mount: str) -> None:
    """Loop-mount a node's image and give its loop device direct I/O.

    ``noinit_itable``: the kernel would otherwise zero every inode table in the background,
    turning the sparse image into gigabytes of real writes. Direct I/O: the node's file
    system then writes through to the host's disk as it would to a disk of its own, instead
    of into a second page cache (the image file's) whose write-back is slow and shared by
    every node; ``fsync`` then costs what the disk costs. Where the host's file system
    refuses direct I/O (tmpfs), the loop device stays buffered.
    """
    subprocess.run(
        ["mount", "-o", "loop,noinit_itable", image, mount],
        check=True,
        capture_output=True,
        text=True,
    )
    found = subprocess.run(
        ["findmnt", "--noheadings", "--output", "SOURCE", "--mountpoint", mount],
        capture_output=True,
        text=True,
    )
    device = found.stdout.strip().splitlines()[-1] if found.stdout.strip() else ""
    if not device.startswith("/dev/loop"):
        return
    done = subprocess.run(
        ["losetup", "--direct-io=on", device], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(f"{image}: buffered loop device ({done.stderr.strip()})", file=sys.stderr)


def _mount_system(image: str, mount: Path, node: str) -> None:
    _mount_image(image, str(mount))
    _seed_system(mount, node)
    for name, target in SYSTEM_BINDS.items():
        os.makedirs(target, exist_ok=True)  # on the shared root: an empty mount point
        subprocess.run(
            ["mount", "--bind", str(mount / name), target],
            check=True,
            capture_output=True,
            text=True,
        )


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stead.lab.holder")
    parser.add_argument("--lab-dir", required=True, help="marks the process as this lab's")
    parser.add_argument("--node", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--system-image", default="")
    parser.add_argument("--system-mount", default="")
    parser.add_argument("--pid-file", required=True)
    args = parser.parse_args(argv)
    pid_file = Path(args.pid_file)
    failed = pid_file.with_suffix(".failed")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        socket.sethostname(args.node)
        os.makedirs(args.mountpoint, exist_ok=True)
        _mount_image(args.image, args.mountpoint)
        if args.system_image:
            os.makedirs(args.system_mount, exist_ok=True)
            _mount_system(args.system_image, Path(args.system_mount), args.node)
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
