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

from stead.errors import LabError
from stead.lab import Lab, netns, procs
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
    }


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to collect it does not)."""
    return procs.start_time(pid) is not None and not procs.is_zombie(pid)


NOTHING: dict[str, list[Any]] = {"netns": [], "links": [], "loops": [], "mounts": [], "holders": []}


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
    assert netns.node_address(0) == "198.18.0.11"
    assert netns.node_address(2) == "198.18.0.13"


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

    built.kill("secondary")
    assert not built.status()["nodes"]["secondary"]["agent_alive"]
    assert not procs.group_members(first)
    assert built.status()["nodes"]["primary"]["agent_alive"]

    built.start("secondary")
    node = built.status()["nodes"]["secondary"]
    assert node["agent_alive"] and node["agent_pid"] != first
    assert socket_answers(built.socket_path("secondary")) == "standin secondary\n"

    built.stop("secondary", timeout=10)
    assert not built.status()["nodes"]["secondary"]["agent_alive"]
    built.start("secondary")
    built.start("secondary")  # a running agent is left alone
    assert built.status()["nodes"]["secondary"]["agent_alive"]


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
    assert len(netns.loop_devices_under(built.dir)) == 3  # no image mounted twice
    assert built.exec("secondary", ["hostname"], capture=True).stdout.strip() == "secondary"

    built.up(2)
    assert list(built.status()["nodes"]) == ["primary", "secondary"]
    assert "stead-tertiary" not in netns.list_netns()


@pytest.mark.root
@pytest.mark.cluster
def test_down_leaves_nothing_behind(lab: Any) -> None:
    built: Lab = lab(3, agent_cmd="sleep infinity", skip_init=True)
    pids = [p for n in built.status()["nodes"].values() for p in (n["holder_pid"], n["agent_pid"])]
    built.down()
    assert leftovers(built.dir) == NOTHING
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
    cli = [sys.executable, "-m", "stead", "lab", "down", "--all"]
    subprocess.run(cli, check=True, capture_output=True, env=dict(os.environ, STEAD_LAB_DIR="/x"))
    assert leftovers(built.dir) == NOTHING
    assert not any(running(n["agent_pid"]) for n in nodes.values())


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
