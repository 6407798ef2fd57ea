"""The lab: nodes as namespaces with their own host name, file system and address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from stead.config.load import load, load_cluster
from stead.errors import LabError
from stead.lab import Lab, netns, procs, ssh
from stead.lab import dns as labdns
from stead.lab.config import Timing, lab_settings
from stead.lab.nodes import node_names, parse_size

STANDIN = "{python} -m stead.lab.standin --socket {socket}"
ECHO_PORT = 7700

root_cluster = [pytest.mark.root, pytest.mark.cluster]

# Runs inside a node: connect to ADDRESS:7700 (retrying for up to WAIT seconds), send a line,
# expect it back. Exit 0 when echoed, 1 otherwise.
TCP_CLIENT = """
import socket, sys, time
address, wait = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + wait
while True:
    try:
        with socket.create_connection((address, 7700), timeout=1.0) as sock:
            sock.sendall(b"hello lab\\n")
            sys.exit(0 if sock.recv(64) == b"hello lab\\n" else 1)
    except OSError:
        if time.monotonic() >= deadline:
            sys.exit(1)
        time.sleep(0.05)
"""


def reach(lab: Lab, source: str, target: str, wait: float) -> bool:
    address = lab.addresses()[target]
    proc = lab.exec(source, [sys.executable, "-c", TCP_CLIENT, address, str(wait)], timeout=30)
    return proc.returncode == 0


def socket_answers(path: Path) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        return sock.recv(64).decode()


def leftovers(lab_dir: Path) -> dict[str, Any]:
    mounts = Path("/proc/self/mountinfo").read_text()
    return {
        "netns": netns.list_netns(),
        "links": netns.list_lab_links(),
        "loops": netns.loop_devices_under(lab_dir),
        "mounts": [line for line in mounts.splitlines() if "stead-" in line or "/srv/lab" in line],
        "holders": procs.holder_processes(),
        "sshd": ssh.sshd_processes(),
        "client_hosts": ssh.client_hosts_file().exists(),
        "named": labdns.named_processes(),
        "client_resolver": [str(p) for p in labdns.client_resolver_files().values() if p.exists()],
        "mount_points": [p for p in ("/opt/lab", "/etc/lab") if Path(p).exists()],
    }


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to collect it does not)."""
    return procs.start_time(pid) is not None and not procs.is_zombie(pid)


NOTHING: dict[str, Any] = {
    "netns": [],
    "links": [],
    "loops": [],
    "mounts": [],
    "holders": [],
    "sshd": [],
    "client_hosts": False,
    "named": [],
    "client_resolver": [],
    "mount_points": [],
}


# -- without root ---------------------------------------------------------------------------


def test_node_names_and_sizes() -> None:
    assert node_names(5) == ["primary", "secondary", "tertiary", "node4", "node5"]
    assert parse_size("2G") == 2 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096
    with pytest.raises(LabError):
        parse_size("lots")


def test_interface_names_fit_the_kernel_limit() -> None:
    assert netns.veth_name("secondary", 1) == "stv-secondary"
    assert netns.veth_name("a-very-long-node-name", 6) == "stv-7"
    assert netns.pub_veth_name("secondary", 1) == "stv-p-secondary"
    assert netns.pub_veth_name("node10", 9) == "stv-p-node10"
    assert netns.pub_veth_name("a-very-long-node-name", 6) == "stv-p-7"
    assert netns.client_veth() == "stv-client"
    # Every host-side name starts with the prefix that `stead lab down --all` sweeps.
    assert all(
        len(name) <= netns.IFNAMSIZ and name.startswith(netns.VETH_PREFIX)
        for name in (netns.pub_veth_name("tertiary", 2), netns.client_veth())
    )


def test_address_plan() -> None:
    assert netns.node_address(0) == "198.18.0.11"
    assert netns.node_address(2) == "198.18.0.13"
    assert netns.node_public_address(0) == "198.19.0.11"
    assert netns.node_public_address(2) == "198.19.0.13"
    # .100 is the service address, which only the active agent puts on its pub0.
    assert netns.node_public_address(88) == "198.19.0.99"
    assert netns.node_public_address(89) == "198.19.0.101"
    assert len({netns.node_public_address(i) for i in range(200)}) == 200
    assert netns.SERVICE_ADDRESS not in {netns.node_public_address(i) for i in range(200)}
    assert (netns.PUB_GATEWAY, netns.CLIENT_ADDRESS) == ("198.19.0.1", "198.19.0.2")
    with pytest.raises(LabError, match="no address left"):
        netns.node_public_address(244)


def init_cluster(out: Path) -> str:
    """``stead init`` for a two-node lab, as the lab runs it; returns its cluster.toml."""
    argv = [sys.executable, "-m", "stead", "init", "--cluster-name", "lab", "--out", str(out)]
    argv += ["--node", "primary=198.18.0.11", "--node", "secondary=198.18.0.12"]
    argv += ["--active", "primary", "--protect", "/srv/lab", "--force"]
    subprocess.run(argv, check=True, capture_output=True)
    return (out / "cluster.toml").read_text()


def test_lab_settings_make_a_cluster_configuration_the_schema_accepts(tmp_path: Path) -> None:
    text = lab_settings(init_cluster(tmp_path), protect="/srv/lab")
    (tmp_path / "lab.toml").write_text(text)
    cluster = load_cluster(tmp_path / "lab.toml")
    assert cluster.failover.witnesses == ["198.19.0.1"]
    assert cluster.public.hostname == "labsvc"
    assert [(a.address, a.interface) for a in cluster.public.addresses] == [
        ("198.19.0.100/24", "pub0")
    ]
    assert cluster.public.service_port == 8080
    [demo] = cluster.services
    assert demo.name == "demo"
    assert demo.exec[:3] == [sys.executable, "-m", "stead.lab.demo_service"]
    assert demo.exec[3:] == ["--port", "8080", "--data", "/srv/lab/demo"]
    [check] = demo.checks
    assert (check.kind, check.url) == ("http", "http://127.0.0.1:8080/health")
    assert (check.interval, check.timeout, check.failures) == (1.0, 0.5, 3)
    # Applying the settings again changes nothing: `up` may run any number of times.
    assert lab_settings(text, protect="/srv/lab") == text

    timed = lab_settings(text, protect="/srv/lab", timing=Timing(0.25, 1.0))
    (tmp_path / "timed.toml").write_text(timed)
    cluster = load_cluster(tmp_path / "timed.toml")
    assert (cluster.channel.heartbeat, cluster.failover.timeout) == (0.25, 1.0)
    with pytest.raises(LabError, match="at least 4 heartbeats"):
        lab_settings(text, protect="/srv/lab", timing=Timing(heartbeat=1.0, failover_timeout=1.0))
    with pytest.raises(LabError, match="heartbeat"):
        lab_settings(text, protect="/srv/lab", timing=Timing(heartbeat=-1))


def test_the_client_resolves_management_names_by_file_and_the_public_name_by_dns() -> None:
    text = ssh.hosts_text({"primary": "198.19.0.11", "node4": "198.19.0.14"})
    assert text.splitlines() == [
        "127.0.0.1\tlocalhost",
        "198.19.0.11\tprimary.lab.test primary PRIMARY",
        "198.19.0.14\tnode4.lab.test node4 NODE4",
    ]  # labsvc.lab.test: from the lab's DNS server only
    assert ssh.client_hosts_file() == Path("/etc/netns/stead-client/hosts")


def test_sshd_configuration_allows_the_lab_key_only(tmp_path: Path) -> None:
    from stead.lab.config import NodePaths

    paths = NodePaths(tmp_path / "primary")
    lines = ssh.sshd_config_text("primary", paths, "198.19.0.11").splitlines()
    settings = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines if line[:1] != "#"}
    assert [line for line in lines if line.startswith("ListenAddress")] == [
        "ListenAddress 198.19.0.11:22",
        "ListenAddress 198.19.0.100:22",
    ]
    assert settings["AuthorizedKeysFile"] == f'"{tmp_path}/primary/ssh/authorized_keys"'
    assert settings["PidFile"] == f'"{tmp_path}/primary/run/sshd.pid"'
    assert settings["HostKey"] == f'"{tmp_path}/primary/ssh/ssh_host_ed25519_key"'
    assert (settings["PasswordAuthentication"], settings["UsePAM"]) == ("no", "no")
    client = ssh.ClientFiles(tmp_path)
    assert ssh.ssh_argv(client, "primary.lab.test", ["hostname"]) == [
        "ssh",
        "-F",
        f"{tmp_path}/client/ssh_config",
        "-i",
        f"{tmp_path}/client/id_ed25519",
        "--",
        "root@primary.lab.test",
        "hostname",
    ]


# -- with root ------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.cluster
def test_nodes_have_their_own_host_name_and_file_system(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    for name in node_names(3):
        proc = built.exec(name, ["hostname"], capture=True, check=True)
        assert proc.stdout.strip() == name
    built.exec("primary", ["sh", "-c", "echo mine > /srv/lab/only-primary"], check=True)
    assert built.exec("primary", ["cat", "/srv/lab/only-primary"], capture=True).stdout == "mine\n"
    assert built.exec("secondary", ["test", "-e", "/srv/lab/only-primary"]).returncode == 1
    assert (built.node_fs_path("primary") / "only-primary").read_text() == "mine\n"
    assert not (built.node_fs_path("secondary") / "only-primary").exists()
    assert not Path("/srv/lab/only-primary").exists()  # not on the host either
    # System trees and a package database of each node's own, beside the protected path.
    built.exec("primary", ["sh", "-c", "echo 2.0 > /opt/lab/app/VERSION"], check=True)
    for name, version in (("primary", "2.0\n"), ("secondary", "1.0\n")):
        assert built.exec(name, ["cat", "/opt/lab/app/VERSION"], capture=True).stdout == version
        node_conf = built.exec(name, ["cat", "/etc/lab/node.conf"], capture=True).stdout
        assert node_conf == f"node = {name}\n"
        dpkg = built.exec(name, ["findmnt", "-n", "-o", "SOURCE", "/var/lib/dpkg"], capture=True)
        assert "[/dpkg]" in dpkg.stdout
    assert not Path("/opt/lab/app").exists()
    status = built.status()
    assert status["bridge_address"] == "198.18.0.1"
    assert built.addresses() == {
        "primary": "198.18.0.11",
        "secondary": "198.18.0.12",
        "tertiary": "198.18.0.13",
    }
    for name, node in status["nodes"].items():
        assert node["holder_alive"] and node["agent_alive"] and not node["partitioned"]
        assert socket_answers(built.socket_path(name)) == f"standin {name}\n"
    assert built.active_socket() == built.socket_path("primary")


@pytest.mark.root
@pytest.mark.cluster
def test_nodes_reach_each_other_until_partitioned(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    assert reach(built, "primary", "secondary", wait=5)
    assert reach(built, "secondary", "tertiary", wait=5)
    assert reach(built, "tertiary", "primary", wait=5)

    built.partition("secondary")
    assert built.status()["nodes"]["secondary"]["partitioned"]
    assert not reach(built, "primary", "secondary", wait=0)
    assert not reach(built, "secondary", "tertiary", wait=0)
    assert reach(built, "primary", "tertiary", wait=5)

    built.heal()
    assert not built.status()["nodes"]["secondary"]["partitioned"]
    assert reach(built, "primary", "secondary", wait=10)
    assert reach(built, "secondary", "tertiary", wait=10)


def ping(lab: Lab, source: str, address: str, interface: str | None = None) -> bool:
    """One echo, answered within a second (links that were just healed get three)."""
    return lab.ping(source, address, timeout=1.0, count=3, interface=interface)


def pings_once(lab: Lab, source: str, address: str) -> bool:
    return lab.ping(source, address, timeout=0.5)


def mac(lab: Lab, node: str) -> str:
    links = json.loads(lab.exec(node, ["ip", "-j", "link", "show", "pub0"], capture=True).stdout)
    return str(links[0]["address"])


def client_neighbour(address: str) -> str | None:
    out = subprocess.run(
        ["ip", "-n", "stead-client", "-j", "neigh", "show", address],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr")) if entries else None


# Runs inside a node: send one gratuitous ARP (a broadcast request for our own address) on
# pub0, as an identity backend does when it takes the service address.
GRATUITOUS_ARP = """
import socket, struct, sys
address = socket.inet_aton(sys.argv[1])
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
    sock.bind(("pub0", 0))
    mac = sock.getsockname()[4]
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, address, bytes(6), address)
    sock.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
"""


@pytest.mark.root
@pytest.mark.cluster
def test_the_client_reaches_the_public_network_only(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd="sleep infinity", skip_init=True)
    status = built.status()
    assert ping(built, "client", "198.19.0.1")  # the gateway, the failover witness
    for name, node in status["nodes"].items():
        assert ping(built, "client", node["public_address"]), name
        assert not pings_once(built, "client", node["channel_address"]), name
        assert ping(built, name, "198.19.0.1", interface="pub0"), name
    # `stead lab exec client` runs a command in the client's network namespace.
    proc = subprocess.run(
        [sys.executable, "-m", "stead", "lab", "exec", "client", "--", "ip", "-4", "-j", "addr"],
        capture_output=True,
        text=True,
        env=dict(os.environ, STEAD_LAB_DIR=str(built.dir)),
        check=True,
    )
    addresses = {
        info["local"] for link in json.loads(proc.stdout) for info in link.get("addr_info", [])
    }
    assert addresses == {"127.0.0.1", "198.19.0.2"}

    # A node answers ARP on pub0 only for pub0's addresses: a client told that a channel
    # address is on its segment still gets no answer for it.
    route = ["ip", "-n", "stead-client", "route", "add", "198.18.0.11/32", "dev", "eth0"]
    subprocess.run(route, check=True)
    assert not pings_once(built, "client", "198.18.0.11")
    arp_ignore = "/proc/sys/net/ipv4/conf/pub0/arp_ignore"
    built.exec("primary", ["sh", "-c", f"echo 0 > {arp_ignore}"], check=True)
    assert ping(built, "client", "198.18.0.11"), "without arp_ignore it would answer"
    built.exec("primary", ["sh", "-c", f"echo 1 > {arp_ignore}"], check=True)


@pytest.mark.root
@pytest.mark.cluster
def test_the_service_address_moves_with_a_gratuitous_arp(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd="sleep infinity", skip_init=True)
    service = f"{netns.SERVICE_ADDRESS}/24"
    built.exec("primary", ["ip", "addr", "add", service, "dev", "pub0"], check=True)
    assert ping(built, "client", netns.SERVICE_ADDRESS)
    assert client_neighbour(netns.SERVICE_ADDRESS) == mac(built, "primary")

    built.exec("primary", ["ip", "addr", "del", service, "dev", "pub0"], check=True)
    built.exec("secondary", ["ip", "addr", "add", service, "dev", "pub0"], check=True)
    garp = [sys.executable, "-c", GRATUITOUS_ARP, netns.SERVICE_ADDRESS]
    built.exec("secondary", garp, check=True)
    # Without the update the client would keep sending to the primary's MAC for seconds.
    assert procs.wait_until(
        lambda: client_neighbour(netns.SERVICE_ADDRESS) == mac(built, "secondary"), 2
    )
    assert pings_once(built, "client", netns.SERVICE_ADDRESS)


@pytest.mark.root
@pytest.mark.cluster
def test_partition_one_network_at_a_time(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    stead = [sys.executable, "-m", "stead", "lab"]
    env = dict(os.environ, STEAD_LAB_DIR=str(built.dir))
    public = built.status()["nodes"]["secondary"]["public_address"]

    subprocess.run([*stead, "partition", "secondary", "--network", "channel"], env=env, check=True)
    node = built.status()["nodes"]["secondary"]
    assert node["partitioned"] and node["partitioned_from"] == ["channel"]
    assert not reach(built, "primary", "secondary", wait=0)
    assert ping(built, "secondary", "198.19.0.1", interface="pub0")  # still sees the witness
    assert ping(built, "client", public)
    subprocess.run([*stead, "heal", "secondary"], env=env, check=True)
    assert built.status()["nodes"]["secondary"]["partitioned_from"] == []
    assert reach(built, "primary", "secondary", wait=10)

    subprocess.run([*stead, "partition", "secondary", "--network", "public"], env=env, check=True)
    assert built.status()["nodes"]["secondary"]["partitioned_from"] == ["public"]
    assert not pings_once(built, "secondary", "198.19.0.1")
    assert not pings_once(built, "client", public)
    assert reach(built, "primary", "secondary", wait=5)  # the channel is untouched
    subprocess.run([*stead, "heal"], env=env, check=True)
    assert ping(built, "client", public)
    assert ping(built, "secondary", "198.19.0.1")

    built.partition("tertiary")  # the API's default: both networks
    assert built.status()["nodes"]["tertiary"]["partitioned_from"] == ["channel", "public"]
    assert not reach(built, "primary", "tertiary", wait=0)
    assert not pings_once(built, "client", built.status()["nodes"]["tertiary"]["public_address"])
    built.heal("tertiary", network="channel")
    assert built.status()["nodes"]["tertiary"]["partitioned_from"] == ["public"]
    built.heal()
    assert not built.status()["nodes"]["tertiary"]["partitioned"]
    with pytest.raises(LabError, match="no network"):
        built.partition("tertiary", "private")  # type: ignore[arg-type]


@pytest.mark.root
@pytest.mark.cluster
def test_kill_stop_and_start_the_agent(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    first = built.status()["nodes"]["secondary"]["agent_pid"]
    # Something the agent started, in its process group, dies with it.
    child = built.exec(
        "secondary", ["sh", "-c", f"ps -o pgid= -p {first}"], capture=True, check=True
    )
    assert int(child.stdout) == first

    sshd = built.status()["nodes"]["secondary"]["sshd_pid"]
    built.kill("secondary")
    assert not built.status()["nodes"]["secondary"]["agent_alive"]
    assert not procs.group_members(first)
    assert built.status()["nodes"]["primary"]["agent_alive"]
    # The management SSH server is no part of the agent: it outlives a kill.
    node = built.status()["nodes"]["secondary"]
    assert node["sshd_alive"] and node["sshd_pid"] == sshd
    login = built.ssh("secondary.lab.test", ["hostname"])
    assert (login.returncode, login.stdout) == (0, "secondary\n"), login.stderr

    built.start("secondary")
    node = built.status()["nodes"]["secondary"]
    assert node["agent_alive"] and node["agent_pid"] != first
    assert socket_answers(built.socket_path("secondary")) == "standin secondary\n"

    built.stop("secondary", timeout=10)
    assert not built.status()["nodes"]["secondary"]["agent_alive"]
    built.start("secondary")
    built.start("secondary")  # a running agent is left alone
    assert built.status()["nodes"]["secondary"]["agent_alive"]
    assert built.status()["nodes"]["secondary"]["sshd_pid"] == sshd


@pytest.mark.root
@pytest.mark.cluster
def test_sigstop_freezes_the_agent(lab: Any) -> None:
    built: Lab = lab(1, agent_cmd="sleep infinity", skip_init=True)
    pid = built.status()["nodes"]["primary"]["agent_pid"]

    def state() -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    built.sigstop("primary")
    assert procs.wait_until(lambda: state() == "T", 5)
    built.sigcont("primary")
    assert procs.wait_until(lambda: state() == "S", 5)


@pytest.mark.root
@pytest.mark.cluster
def test_fill_and_free_the_disk(lab: Any) -> None:
    built: Lab = lab(1, agent_cmd="sleep infinity", skip_init=True, disk_size="64M")
    built.fill_disk("primary")
    write = ["sh", "-c", "head -c 1048576 /dev/zero > /srv/lab/more"]
    full = built.exec("primary", write, capture=True)
    assert full.returncode != 0 and "No space left" in full.stderr
    built.free_disk("primary")
    built.exec("primary", write, check=True)


@pytest.mark.root
@pytest.mark.cluster
def test_netem_delays_packets_or_says_why_not(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    if not netns.netem_supported():
        # Kernels without sch_netem (CONFIG_NET_SCH_NETEM unset): a clear refusal, no skip.
        with pytest.raises(LabError, match="netem"):
            built.netem("secondary", delay_ms=50)
        return
    built.netem("secondary", delay_ms=50)
    out = subprocess.run(["tc", "qdisc", "show", "dev", "stv-secondary"], capture_output=True)
    assert b"netem" in out.stdout
    assert reach(built, "primary", "secondary", wait=5)
    built.netem("secondary")
    out = subprocess.run(["tc", "qdisc", "show", "dev", "stv-secondary"], capture_output=True)
    assert b"netem" not in out.stdout


@pytest.mark.root
@pytest.mark.cluster
def test_up_again_keeps_what_runs_and_repairs_the_rest(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd="sleep infinity", skip_init=True)
    before = built.status()["nodes"]
    os.kill(before["secondary"]["holder_pid"], signal.SIGKILL)
    built.kill("primary")

    built.up(3)
    after = built.status()["nodes"]
    assert list(after) == ["primary", "secondary", "tertiary"]
    assert after["primary"]["holder_pid"] == before["primary"]["holder_pid"]
    assert after["primary"]["agent_pid"] != before["primary"]["agent_pid"]
    assert after["secondary"]["holder_pid"] != before["secondary"]["holder_pid"]
    assert all(n["holder_alive"] and n["agent_alive"] for n in after.values())
    assert len(netns.loop_devices_under(built.dir)) == 6  # two images a node, none twice
    assert built.exec("secondary", ["hostname"], capture=True).stdout.strip() == "secondary"

    built.up(2)
    assert list(built.status()["nodes"]) == ["primary", "secondary"]
    assert "stead-tertiary" not in netns.list_netns()


@pytest.mark.root
@pytest.mark.cluster
def test_down_leaves_nothing_behind(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd="sleep infinity", skip_init=True)
    nodes = built.status()["nodes"].values()
    pids = [p for n in nodes for p in (n["holder_pid"], n["agent_pid"], n["sshd_pid"])]
    assert all(n["sshd_alive"] for n in nodes)
    assert ssh.client_hosts_file().exists()
    assert labdns.named_processes(str(built.dir)) == [built.status()["dns"]["pid"]]
    links = netns.list_lab_links()
    assert {"stead-pub0", "stv-client", "stv-dns", "stv-p-primary"} <= set(links)
    assert {"stead-client", "stead-dns"} <= set(netns.list_netns())
    client = built.popen("client", ["sleep", "infinity"])  # something running in the client
    built.down()
    assert client.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(built.dir) == NOTHING  # no bridge, veth or namespace, the client's too
    assert not any(running(pid) for pid in pids)
    assert not built.status()["up"]
    built.down()  # idempotent


@pytest.mark.root
@pytest.mark.cluster
def test_down_all_cleans_up_after_a_crash(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd="sleep infinity", skip_init=True)
    nodes = built.status()["nodes"]
    for node in nodes.values():
        os.kill(node["holder_pid"], signal.SIGKILL)
    (built.dir / "lab.json").unlink()  # a crash may leave no state at all
    # sshd is found by its configuration too, should its namespace be gone as well.
    assert sorted(ssh.sshd_processes(str(built.dir))) == sorted(
        n["sshd_pid"] for n in nodes.values()
    )
    assert ssh.sshd_processes(str(built.dir / "other")) == []
    named = labdns.named_processes(str(built.dir))  # so is the lab's DNS server
    assert len(named) == 1 and labdns.named_processes(str(built.dir / "other")) == []
    cli = [sys.executable, "-m", "stead", "lab", "down", "--all"]
    subprocess.run(cli, check=True, capture_output=True, env=dict(os.environ, STEAD_LAB_DIR="/x"))
    assert leftovers(built.dir) == NOTHING
    assert not any(running(n["agent_pid"]) for n in nodes.values())
    assert not any(running(n["sshd_pid"]) for n in nodes.values())
    assert not running(named[0])


@pytest.mark.root
@pytest.mark.cluster
def test_cli_exec_passes_stdin_stdout_and_exit_code(lab: Any) -> None:
    built: Lab = lab(2, agent_cmd="sleep infinity", skip_init=True)
    stead = [sys.executable, "-m", "stead", "lab"]
    env = dict(os.environ, STEAD_LAB_DIR=str(built.dir))
    script = 'read line; echo "$(hostname): $line $STEAD_CONFIG_DIR"; exit 3'
    proc = subprocess.run(
        [*stead, "exec", "secondary", "--", "sh", "-c", script],
        input="hello\n",
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == f"secondary: hello {built.dir}/secondary/etc\n"
    status = subprocess.run(
        [*stead, "status", "--json"], capture_output=True, text=True, env=env, check=True
    )
    data = json.loads(status.stdout)
    assert data["bridge_address"] == "198.18.0.1"
    assert data["nodes"]["secondary"]["address"] == "198.18.0.12"
    assert data["public_bridge"] == "stead-pub0" and data["public_bridge_present"]
    assert data["public_gateway"] == "198.19.0.1"
    assert (data["service_address"], data["service_prefix_len"]) == ("198.19.0.100", 24)
    assert (data["service_interface"], data["service_port"]) == ("pub0", 8080)
    assert data["client"] == {
        "name": "client",
        "netns": "stead-client",
        "address": "198.19.0.2",
        "veth": "stv-client",
        "present": True,
    }
    assert (data["dns"]["address"], data["dns"]["port"], data["dns"]["zone"]) == (
        "198.19.0.3",
        53,
        "lab.test",
    )
    assert data["dns"]["alive"] and data["dns"]["key_file"] == f"{built.dir}/dns/stead-lab.key"
    for index, (name, node) in enumerate(data["nodes"].items()):
        assert node["channel_address"] == f"198.18.0.{11 + index}"
        assert node["public_address"] == f"198.19.0.{11 + index}"
        assert node["netns"] == f"stead-{name}"
    subprocess.run([*stead, "partition", "secondary"], env=env, check=True)
    assert built.status()["nodes"]["secondary"]["partitioned"]
    subprocess.run([*stead, "heal"], env=env, check=True)
    assert not built.status()["nodes"]["secondary"]["partitioned"]


@pytest.mark.root
@pytest.mark.cluster
def test_up_writes_each_node_its_configuration(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd="sleep infinity", skip_init=False)
    for name in node_names(3):
        etc = built.dir / name / "etc"
        node = tomllib.loads((etc / "node.toml").read_text())
        assert node["node"] == name
        assert node["state_dir"] == str(built.dir / name / "state")
        assert node["api_socket"] == str(built.socket_path(name))
        assert {"cluster.toml", "ca.pem", "node.pem", "node.key"} <= {p.name for p in etc.iterdir()}
    cluster = tomllib.loads((built.dir / "primary" / "etc" / "cluster.toml").read_text())
    assert "198.18.0.12" in json.dumps(cluster)
    for name in node_names(3):
        loaded = load(built.dir / name / "etc")  # what `stead config check` runs
        assert loaded.name == name
        assert loaded.cluster.failover.witnesses == ["198.19.0.1"]
        assert loaded.cluster.public.addresses[0].address == "198.19.0.100/24"
        assert [service.name for service in loaded.cluster.services] == ["demo"]

    # Failover timing: written, recorded for later `up`s, and the agents restarted for it.
    before = {n: v["agent_pid"] for n, v in built.status()["nodes"].items()}
    built.up(3, heartbeat=0.25, failover_timeout=1.5)
    after = {n: v["agent_pid"] for n, v in built.status()["nodes"].items()}
    assert all(after[n] != before[n] for n in before)
    built.up(3)
    assert {n: v["agent_pid"] for n, v in built.status()["nodes"].items()} == after
    for name in node_names(3):
        loaded = load(built.dir / name / "etc")
        assert (loaded.cluster.channel.heartbeat, loaded.cluster.failover.timeout) == (0.25, 1.5)
    cli = [sys.executable, "-m", "stead", "lab", "up", "--dir", str(built.dir)]
    refused = subprocess.run(
        [*cli, "--heartbeat", "1", "--failover-timeout", "2"], capture_output=True, text=True
    )
    assert refused.returncode != 0 and "at least 4 heartbeats" in refused.stderr
    assert load(built.dir / "primary" / "etc").cluster.channel.heartbeat == 0.25
    assert {n: v["agent_pid"] for n, v in built.status()["nodes"].items()} == after


@pytest.mark.root
@pytest.mark.cluster
def test_nftables_drop_without_netem(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd=STANDIN, wait_ready=True, skip_init=True)
    built.drop("secondary", 100)
    assert not reach(built, "primary", "secondary", wait=0)
    assert reach(built, "primary", "tertiary", wait=5)  # only that node's frames
    built.drop("secondary", 0)
    assert reach(built, "primary", "secondary", wait=10)
    built.drop("tertiary", 30)
    with pytest.raises(LabError, match="between 0 and 100"):
        built.drop("tertiary", 150)
    built.down()
    listed = subprocess.run(
        ["nft", "list", "table", "bridge", netns.NFT_TABLE], capture_output=True, check=False
    )
    assert listed.returncode != 0, "down leaves no nftables table behind"
