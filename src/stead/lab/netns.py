"""Network plumbing of the lab: two bridges on the host, one namespace per node.

Two networks, as on real hosts: the channel network (bridge ``stead-br0``, 198.18.0.0/24),
which carries the agents' channels, and the public network (bridge ``stead-pub0``,
198.19.0.0/24), where clients reach the service address and the host's bridge address is the
gateway (the failover witness). Each node has ``eth0`` on the first and ``pub0`` on the
second; a client namespace, and the lab's DNS server's (``stead-dns``, 198.19.0.3), have one
link each, on the public network only.

Every name here follows a convention (netns ``stead-<node>``, host-side veths ``stv-<node>``
and ``stv-p-<node>``, bridges ``stead-br0`` and ``stead-pub0``), so that a crashed run can be
cleaned up by name alone, without its state file. All changes go through the ``ip`` and
``tc`` commands: they are stable, their errors are readable, and the same commands work by
hand when debugging a lab.
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
PUB_VETH_PREFIX = f"{VETH_PREFIX}p-"
NODE_IFNAME = "eth0"
FIRST_HOST = 10
IFNAMSIZ = 15
NETNS_RUN_DIR = Path("/run/netns")

# The public network. The service address is not configured by the lab: the active agent
# adds it to ``pub0`` (its identity backend), and takes it away when it stops being active.
PUB_BRIDGE = "stead-pub0"
PUB_GATEWAY = "198.19.0.1"
PUB_IFNAME = "pub0"
SERVICE_ADDRESS = "198.19.0.100"
CLIENT = "client"
CLIENT_ADDRESS = "198.19.0.2"
CLIENT_IFNAME = "eth0"
# The lab's DNS server (``stead.lab.dns``): a namespace of its own on the public network.
DNS = "dns"
DNS_ADDRESS = "198.19.0.3"

BRIDGES = (BRIDGE, PUB_BRIDGE)


def _host_address(network_base: str, index: int, *, skip: str | None = None) -> str:
    host = FIRST_HOST + index + 1
    base = ipaddress.IPv4Address(network_base)
    if skip is not None and host >= int(ipaddress.IPv4Address(skip)) - int(base) + 1:
        host += 1
    if not 0 < host < 255:
        raise LabError(f"no address left for node number {index + 1}")
    return str(base + (host - 1))


def node_address(index: int) -> str:
    """Channel address of the node at ``index`` (0-based): 198.18.0.11, .12, ..."""
    return _host_address(BRIDGE_ADDRESS, index)


def node_public_address(index: int) -> str:
    """Public-network address of the node at ``index``: 198.19.0.11, .12, ... (.100, the
    service address, is skipped)."""
    return _host_address(PUB_GATEWAY, index, skip=SERVICE_ADDRESS)


def netns_name(node: str) -> str:
    return f"{NETNS_PREFIX}{node}"


def veth_name(node: str, index: int) -> str:
    """Host-side veth name; interface names are limited to 15 characters."""
    name = f"{VETH_PREFIX}{node}"
    return name if len(name) <= IFNAMSIZ else f"{VETH_PREFIX}{index + 1}"


def pub_veth_name(node: str, index: int) -> str:
    """Host-side name of the node's veth on the public bridge (``stv-p-<node>``)."""
    name = f"{PUB_VETH_PREFIX}{node}"
    return name if len(name) <= IFNAMSIZ else f"{PUB_VETH_PREFIX}{index + 1}"


def client_netns() -> str:
    return netns_name(CLIENT)


def client_veth() -> str:
    return f"{VETH_PREFIX}{CLIENT}"


def dns_netns() -> str:
    return netns_name(DNS)


def dns_veth() -> str:
    return f"{VETH_PREFIX}{DNS}"


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
    """Every lab link in the host namespace: veths ``stv-*`` and the two bridges."""
    names = [str(link.get("ifname", "")) for link in _ip_json(["link", "show"])]
    return sorted(n for n in names if n.startswith(VETH_PREFIX) or n in BRIDGES)


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


def _sysctl_in(ns: str, settings: dict[str, str]) -> None:
    """Write ``/proc/sys`` keys inside a namespace (``net.*`` keys are per namespace)."""
    script = "; ".join(f"echo {value} > /proc/sys/{key}" for key, value in settings.items())
    run(["ip", "netns", "exec", ns, "sh", "-ec", script])


def ensure_bridge(name: str = BRIDGE, address: str = BRIDGE_ADDRESS) -> None:
    """Create a host bridge with its address, or leave an existing one as it is."""
    if not link_exists(name):
        run(["ip", "link", "add", name, "type", "bridge"])
    _disable_ipv6(f"/proc/sys/net/ipv6/conf/{name}")
    cidr = f"{address}/{PREFIX_LEN}"
    run(["ip", "addr", "replace", cidr, "dev", name])
    run(["ip", "link", "set", name, "up"])


def ensure_bridges() -> None:
    """Both lab bridges; the host's address on the public one is the nodes' gateway."""
    ensure_bridge(BRIDGE, BRIDGE_ADDRESS)
    ensure_bridge(PUB_BRIDGE, PUB_GATEWAY)
    # The host is a client of the service address too: follow its gratuitous ARP at once.
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv4/conf/{PUB_BRIDGE}/arp_accept").write_text("1\n")


def remove_bridge(name: str = BRIDGE) -> None:
    if link_exists(name):
        run(["ip", "link", "del", name], check=False)


def remove_bridges() -> None:
    for name in BRIDGES:
        remove_bridge(name)


def _add_veth(ns: str, host_side: str, inner: str, bridge: str) -> None:
    """A veth pair: ``host_side`` on ``bridge``, ``inner`` in the namespace (replaced)."""
    if link_exists(host_side):
        run(["ip", "link", "del", host_side], check=False)
    run(["ip", "-n", ns, "link", "del", inner], check=False)
    run(["ip", "link", "add", host_side, "type", "veth", "peer", "name", inner, "netns", ns])
    _disable_ipv6(f"/proc/sys/net/ipv6/conf/{host_side}")
    run(["ip", "link", "set", host_side, "master", bridge])
    run(["ip", "link", "set", host_side, "up"])
    disable = f"echo 1 > /proc/sys/net/ipv6/conf/{inner}/disable_ipv6 || true"
    run(["ip", "netns", "exec", ns, "sh", "-c", disable], check=False)


def create_node_network(node: str, index: int, address: str, public_address: str) -> None:
    """Namespace; ``eth0`` on the channel bridge, ``pub0`` on the public one; ``lo`` up."""
    ns = netns_name(node)
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    in_ns = ["ip", "-n", ns]
    _add_veth(ns, veth_name(node, index), NODE_IFNAME, BRIDGE)
    _add_veth(ns, pub_veth_name(node, index), PUB_IFNAME, PUB_BRIDGE)
    # The service address moves between nodes' pub0: a node answers ARP only for addresses
    # of the interface asked on, and announces with the address of the interface it sends
    # from, so that no stale node claims the service address on the wrong link.
    conf = f"net/ipv4/conf/{PUB_IFNAME}"
    # ip_nonlocal_bind: servers of every node (its sshd) listen on the service address too,
    # before the node holds it, as on real HA hosts; only the holder receives its packets.
    settings = {f"{conf}/arp_ignore": "1", f"{conf}/arp_announce": "2"}
    _sysctl_in(ns, {**settings, "net/ipv4/ip_nonlocal_bind": "1"})
    run([*in_ns, "addr", "replace", f"{address}/{PREFIX_LEN}", "dev", NODE_IFNAME])
    run([*in_ns, "addr", "replace", f"{public_address}/{PREFIX_LEN}", "dev", PUB_IFNAME])
    run([*in_ns, "link", "set", "lo", "up"])
    run([*in_ns, "link", "set", NODE_IFNAME, "up"])
    run([*in_ns, "link", "set", PUB_IFNAME, "up"])


def _has_address(ns: str, ifname: str, address: str) -> bool:
    for link in _ip_json(["-n", ns, "addr", "show", "dev", ifname]):
        infos = link.get("addr_info")
        if isinstance(infos, list) and any(
            isinstance(i, dict) and i.get("local") == address for i in infos
        ):
            return True
    return False


def node_network_ok(node: str, index: int, address: str, public_address: str) -> bool:
    """Whether the node's namespace, both veths and both addresses are in place."""
    ns = netns_name(node)
    return (
        netns_exists(ns)
        and link_exists(veth_name(node, index))
        and link_exists(pub_veth_name(node, index))
        and _has_address(ns, NODE_IFNAME, address)
        and _has_address(ns, PUB_IFNAME, public_address)
    )


def remove_node_network(ns: str) -> None:
    """Delete a namespace; its veth pairs go with it."""
    if netns_exists(ns):
        run(["ip", "netns", "del", ns], check=False)


def create_public_host(ns: str, veth: str, address: str) -> None:
    """A namespace with one link (``eth0``), on the public bridge only (no route elsewhere)."""
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    _add_veth(ns, veth, CLIENT_IFNAME, PUB_BRIDGE)
    in_ns = ["ip", "-n", ns]
    run([*in_ns, "addr", "replace", f"{address}/{PREFIX_LEN}", "dev", CLIENT_IFNAME])
    run([*in_ns, "link", "set", "lo", "up"])
    run([*in_ns, "link", "set", CLIENT_IFNAME, "up"])


def public_host_ok(ns: str, veth: str, address: str) -> bool:
    return netns_exists(ns) and link_exists(veth) and _has_address(ns, CLIENT_IFNAME, address)


def create_client_network() -> None:
    """The client namespace: one link, on the public bridge only (no route elsewhere).

    It accepts gratuitous ARP for addresses it has not seen yet (``arp_accept``), as a
    client on a real segment does, so that it follows the service address at once.
    """
    create_public_host(client_netns(), client_veth(), CLIENT_ADDRESS)
    _sysctl_in(client_netns(), {f"net/ipv4/conf/{CLIENT_IFNAME}/arp_accept": "1"})


def client_network_ok() -> bool:
    return public_host_ok(client_netns(), client_veth(), CLIENT_ADDRESS)


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


LAB_IMAGES = ("/disk.img", "/system.img")


def lab_loop_devices() -> list[str]:
    """Loop devices backed by a lab disk image, wherever the lab lives."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False)
    if not out.strip():
        return []
    return [
        str(dev["name"])
        for dev in json.loads(out).get("loopdevices", [])
        if str(dev.get("back-file") or "").removesuffix(" (deleted)").endswith(LAB_IMAGES)
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
