"""The installed packages of this node: ``{name: version}`` from dpkg or rpm.

Names carry their architecture where the package manager keeps several side by side
(``libc6:amd64`` from dpkg, ``glibc.x86_64`` from rpm), so that a package installed for a
second architecture on one node only shows as a difference. A name installed in several
versions at once (rpm kernels) maps to its versions joined by ``", "`` in sorted order.

``system.packages`` chooses the manager: ``auto`` takes dpkg when its database exists, then
rpm, else none; ``dpkg`` or ``rpm`` given explicitly must be installed (a clear
:class:`UsageError` otherwise); ``none`` lists nothing. Blocking: run it in a thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from stead.errors import SteadError, UsageError

DPKG_QUERY = ["dpkg-query", "-W", "-f", "${binary:Package}\\t${Version}\\t${db:Status-Abbrev}\\n"]
RPM_QUERY = [
    "rpm",
    "-qa",
    "--qf",
    "%{NAME}.%{ARCH}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n",
]
DPKG_STATUS = "/var/lib/dpkg/status"
TIMEOUT = 120.0


def parse_dpkg(text: str) -> dict[str, str]:
    """Installed packages from ``dpkg-query`` lines (name, version, status abbreviation).

    Only packages whose current state is installed count (second status letter ``i``):
    removed ones that left their configuration files (``rc``) and half-installed ones do not.
    """
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or not fields[0]:
            continue
        name, version, status = fields[0], fields[1], fields[2]
        if len(status) >= 2 and status[1] == "i":
            found.setdefault(name, set()).add(version)
    return _joined(found)


def parse_rpm(text: str) -> dict[str, str]:
    """Installed packages from ``rpm -qa`` lines (``name.arch``, ``[epoch:]version-release``);
    packages without an architecture (``gpg-pubkey``) keep their bare name."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0]:
            continue
        name = fields[0].removesuffix(".(none)")
        found.setdefault(name, set()).add(fields[1])
    return _joined(found)


def _joined(found: dict[str, set[str]]) -> dict[str, str]:
    return {name: ", ".join(sorted(found[name])) for name in sorted(found)}


def pick_manager(mode: str) -> str:
    """The manager ``mode`` (``auto``, ``dpkg``, ``rpm``, ``none``) means on this node."""
    if mode == "auto":
        if shutil.which("dpkg-query") and os.path.exists(DPKG_STATUS):
            return "dpkg"
        return "rpm" if shutil.which("rpm") else "none"
    if mode not in ("dpkg", "rpm", "none"):
        raise UsageError(f"unknown package manager {mode!r} (auto, dpkg, rpm or none)")
    tool = {"dpkg": "dpkg-query", "rpm": "rpm", "none": ""}[mode]
    if tool and not shutil.which(tool):
        raise UsageError(
            f"system.packages is {mode!r} but {tool} is not installed on this node "
            "(set it to auto or none)"
        )
    return mode


def list_packages(mode: str = "auto", *, timeout: float = TIMEOUT) -> tuple[str, dict[str, str]]:
    """(manager used, installed packages by name) on this node; ``("none", {})`` for none."""
    manager = pick_manager(mode)
    if manager == "none":
        return manager, {}
    argv = DPKG_QUERY if manager == "dpkg" else RPM_QUERY
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SteadError(f"{argv[0]} did not answer within {timeout} s") from None
    except OSError as exc:
        raise SteadError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise SteadError(f"{argv[0]} failed: {why[0]}")
    parse = parse_dpkg if manager == "dpkg" else parse_rpm
    return manager, parse(done.stdout)
