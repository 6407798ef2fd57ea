"""Network plumbing of the lab: one bridge on the host, one namespace and veth pair per node.

Every name here follows a convention (netns ``stead-<node>``, host-side veth ``stv-<node>``,
bridge ``stead-br0``), so that a crashed run can be cleaned up by name alone, without its
state file. All changes go through the ``ip`` and ``tc`` commands: they are stable, their
errors are readable, and the same commands work by hand when debugging a lab.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from stead.errors import LabError

log = logging.getLogger(__name__)

BRIDGE = "stead-br0"
BRIDGE_ADDRESS = "198.18.0.1"
PREFIX_LEN = 24
NETNS_PREFIX = "stead-"
VETH_PREFIX = "stv-"
NODE_IFNAME = "eth0"
FIRST_HOST = 10
IFNAMSIZ = 15
NETNS_RUN_DIR = Path("/run/netns")


def node_address(index: int) -> str:
    """Address of the node at ``index`` (0-based): 198.18.0.11, .12, ..."""
    host = FIRST_HOST + index + 1
    if not 0 < host < 255:
        raise LabError(f"no address left for node number {index + 1}")
    return str(ipaddress.IPv4Address(BRIDGE_ADDRESS) + (host - 1))


def netns_name(node: str) -> str:
    return f"{NETNS_PREFIX}{node}"


def veth_name(node: str, index: int) -> str:
    """Host-side veth name; interface names are limited to 15 characters."""
    name = f"{VETH_PREFIX}{node}"
    return name if len(name) <= IFNAMSIZ else f"{VETH_PREFIX}{index + 1}"


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a plumbing command; a failure becomes a LabError that names the command."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{' '.join(argv)}` failed ({proc.returncode}): {detail}")
    return proc.stdout


def _ip_json(argv: Sequence[str]) -> list[dict[str, object]]:
    out = run(["ip", "-json", *argv], check=False).strip()
    if not out:
        return []
    data = json.loads(out)
    return data if isinstance(data, list) else []


def list_netns() -> list[str]:
    """Names of every lab network namespace on this machine."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(NETNS_PREFIX))


def netns_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def netns_inode(name: str) -> int | None:
    """Inode of the namespace (as in ``/proc/PID/ns/net``), or None if it is gone."""
    try:
        return (NETNS_RUN_DIR / name).stat().st_ino
    except OSError:
        return None


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def list_lab_links() -> list[str]:
    """Every lab link in the host namespace: veths ``stv-*`` and the bridge."""
    names = [str(link.get("ifname", "")) for link in _ip_json(["link", "show"])]
    return sorted(n for n in names if n.startswith(VETH_PREFIX) or n == BRIDGE)


def link_is_up(name: str) -> bool:
    """Whether the link is administratively up (``ip link set NAME up``)."""
    try:
        flags = int(Path("/sys/class/net", name, "flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)


def _disable_ipv6(conf_dir: str) -> None:
    # The lab speaks IPv4 only; without IPv6 the links send no router solicitations either.
    with contextlib.suppress(OSError):
        Path(conf_dir, "disable_ipv6").write_text("1\n")


def ensure_bridge() -> None:
    """Create the host bridge with its address, or leave an existing one as it is."""
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _disable_ipv6(f"/proc/sys/net/ipv6/conf/{BRIDGE}")
    cidr = f"{BRIDGE_ADDRESS}/{PREFIX_LEN}"
    run(["ip", "addr", "replace", cidr, "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def remove_bridge() -> None:
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE], check=False)


def create_node_network(node: str, index: int, address: str) -> None:
    """Namespace, veth pair on the bridge, ``eth0`` with its address, ``lo`` up."""
    ns = netns_name(node)
    veth = veth_name(node, index)
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    if link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    in_ns = ["ip", "-n", ns]
    run([*in_ns, "link", "del", NODE_IFNAME], check=False)
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns])
    _disable_ipv6(f"/proc/sys/net/ipv6/conf/{veth}")
    run(["ip", "link", "set", veth, "master", BRIDGE])
    run(["ip", "link", "set", veth, "up"])
    disable = f"echo 1 > /proc/sys/net/ipv6/conf/{NODE_IFNAME}/disable_ipv6 || true"
    run(["ip", "netns", "exec", ns, "sh", "-c", disable], check=False)
    run([*in_ns, "addr", "replace", f"{address}/{PREFIX_LEN}", "dev", NODE_IFNAME])
    run([*in_ns, "link", "set", "lo", "up"])
    run([*in_ns, "link", "set", NODE_IFNAME, "up"])


def node_network_ok(node: str, index: int, address: str) -> bool:
    """Whether the node's namespace, veth and address are all in place."""
    ns = netns_name(node)
    if not netns_exists(ns) or not link_exists(veth_name(node, index)):
        return False
    for link in _ip_json(["-n", ns, "addr", "show", "dev", NODE_IFNAME]):
        infos = link.get("addr_info")
        if isinstance(infos, list) and any(
            isinstance(i, dict) and i.get("local") == address for i in infos
        ):
            return True
    return False


def remove_node_network(ns: str) -> None:
    """Delete a namespace; its veth pair goes with it."""
    if netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)


def set_link(name: str, up: bool) -> None:
    if not link_exists(name):
        raise LabError(f"link {name} does not exist; is the lab up?")
    run(["ip", "link", "set", name, "up" if up else "down"])


def set_netem(veth: str, delay_ms: float, loss_pct: float) -> None:
    """Delay and drop packets sent towards the node (host-side veth egress)."""
    if delay_ms <= 0 and loss_pct <= 0:
        clear_netem(veth)
        return
    args = ["tc", "qdisc", "replace", "dev", veth, "root", "netem"]
    if delay_ms > 0:
        args += ["delay", f"{delay_ms}ms"]
    if loss_pct > 0:
        args += ["loss", f"{loss_pct}%"]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "unknown" in proc.stderr.lower():
            raise LabError("this kernel has no netem queueing discipline (CONFIG_NET_SCH_NETEM)")
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")


def clear_netem(veth: str) -> None:
    run(["tc", "qdisc", "del", "dev", veth, "root"], check=False)


def netem_supported() -> bool:
    """Whether ``tc ... netem`` works here (some minimal kernels lack it)."""
    probe = f"{VETH_PREFIX}probe"
    peer = f"{VETH_PREFIX}probe1"
    run(["ip", "link", "del", probe], check=False)
    try:
        run(["ip", "link", "add", probe, "type", "veth", "peer", "name", peer])
        ok = subprocess.run(
            ["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"],
            capture_output=True,
            check=False,
        )
        return ok.returncode == 0
    finally:
        run(["ip", "link", "del", probe], check=False)


def loop_devices_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory`` (or anywhere if it is /)."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False)
    if not out.strip():
        return []
    root = os.path.realpath(directory)
    found = []
    for dev in json.loads(out).get("loopdevices", []):
        back = str(dev.get("back-file") or "").removesuffix(" (deleted)")
        if back and (back == root or back.startswith(root.rstrip("/") + "/")):
            found.append(str(dev["name"]))
    return found


def lab_loop_devices() -> list[str]:
    """Loop devices backed by a lab disk image, wherever the lab lives."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False)
    if not out.strip():
        return []
    return [
        str(dev["name"])
        for dev in json.loads(out).get("loopdevices", [])
        if str(dev.get("back-file") or "").removesuffix(" (deleted)").endswith("/disk.img")
        and Path(str(dev.get("back-file"))).parent.joinpath(".stead-lab-node").exists()
    ]


NFT_TABLE = "stead_lab"  # a bridge-family table: frames between lab veths pass its forward hook


def set_drop(veth: str, loss_pct: float) -> None:
    """Drop ``loss_pct`` % of the frames to and from one node, at random (nftables).

    For kernels without netem. ``loss_pct`` 0 removes the node's rule; 100 cuts it off
    without taking its link down. The table holds one chain and the rules of every node.
    """
    if not 0 <= loss_pct <= 100:
        raise LabError(f"loss must be between 0 and 100 %, not {loss_pct}")
    clear_drop(veth)
    if loss_pct == 0:
        return
    run(["nft", "add", "table", "bridge", NFT_TABLE])
    run(
        [
            "nft", "add", "chain", "bridge", NFT_TABLE, "forward",
            "{ type filter hook forward priority 0 ; policy accept ; }",
        ]
    )  # fmt: skip
    threshold = round(loss_pct * 100)  # in hundredths of a percent
    chance = [] if threshold >= 10000 else ["numgen", "random", "mod", "10000", "<", str(threshold)]
    for direction in ("iifname", "oifname"):
        rule = ["nft", "add", "rule", "bridge", NFT_TABLE, "forward", direction, veth]
        run([*rule, *chance, "drop", "comment", f'"{veth}"'])


def clear_drop(veth: str | None = None) -> None:
    """Remove the drop rules of one node, or the whole table (``veth`` None)."""
    if subprocess.run(["nft", "list", "table", "bridge", NFT_TABLE], capture_output=True,
                      check=False).returncode != 0:  # fmt: skip
        return
    if veth is None:
        run(["nft", "delete", "table", "bridge", NFT_TABLE], check=False)
        return
    listing = run(["nft", "-a", "list", "chain", "bridge", NFT_TABLE, "forward"], check=False)
    for line in listing.splitlines():
        if f'comment "{veth}"' in line and "# handle " in line:
            handle = line.rsplit("# handle ", 1)[1].strip()
            run(["nft", "delete", "rule", "bridge", NFT_TABLE, "forward", "handle", handle])
