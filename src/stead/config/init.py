"""``stead init``: a new cluster's CA, node certificates and commented configuration files."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from stead import pki
from stead.config.load import load
from stead.config.paths import CLUSTER_FILE, NODE_FILE
from stead.config.schema import NODE_NAME_RE
from stead.errors import UsageError


@dataclass(frozen=True)
class NodeSpec:
    name: str
    addresses: list[str]


def parse_node_spec(text: str) -> NodeSpec:
    """``primary=198.18.0.11`` or ``primary=10.0.0.1,10.0.1.1`` (several channel addresses)."""
    name, sep, addresses = text.partition("=")
    if not sep or not name or not addresses:
        raise UsageError(f"--node {text!r}: expected NAME=ADDRESS[,ADDRESS...]")
    if not NODE_NAME_RE.match(name):
        raise UsageError(f"--node {text!r}: node names are lower-case letters, digits and '-'")
    return NodeSpec(name, [a.strip() for a in addresses.split(",") if a.strip()])


def _q(value: str) -> str:
    return json.dumps(value)


def render_cluster(
    name: str, cluster_id: str, active: str, nodes: list[NodeSpec], protect: list[str]
) -> str:
    protected = "\n".join(
        f'[[protected]]\npath = {_q(path)}\ninclude = ["**"]   # globs: * within a name, '
        f"** across directories\nexclude = []\n"
        for path in protect
    )
    node_blocks = "\n".join(
        f"[[nodes]]\nname = {_q(n.name)}\naddresses = [{', '.join(_q(a) for a in n.addresses)}]"
        f"\npriority = {100 + i * 10}   # lower is preferred as a successor\n"
        "automatic_failover = true   # false: this node takes over only when an operator says\n"
        for i, n in enumerate(nodes)
    )
    return f"""\
# Stead cluster configuration. Keep this file identical on every node.
# Check it with `stead config check`. Sizes take units: 64KiB, 10GiB.

[cluster]
name = {_q(name)}
id = {_q(cluster_id)}          # generated; never change it
active = {_q(active)}          # the node that is active when the cluster first starts

[channel]
port = 7400                 # TCP port of the mutual-TLS channel on every node address
heartbeat = 0.5             # seconds between heartbeats, sent on every channel address
peer_timeout = 5.0          # seconds of silence before a peer counts as lost (>= 3 heartbeats)
connect_timeout = 5.0
max_frame = "64MiB"         # largest frame a peer may send
compression = "auto"        # auto: zstd only while it pays off; always; never
revoked_serials = []        # certificate serial numbers refused at the handshake

[replication]
fsync = "batch"             # journal and receive queue: always | batch (group commit) | never
capture = "auto"            # auto: fanotify where the kernel and file systems allow, else inotify
journal_max = "10GiB"       # a passive further behind is marked out of sync and checked
block_size = "64KiB"        # block of the delta manifest and of the full system check
batch_bytes = "4MiB"        # file data per replication frame
receive_memory = "64MiB"    # a passive applies this much straight from memory, then queues

[failover]
timeout = 2.0               # active silent on every channel this long: a passive takes over
                            # (>= 4 heartbeats; the active fences itself after half of it)
automatic = true            # false: only `stead failover --to NODE` moves the role after a loss
require_sync = true         # a passive that is not in sync never takes over by itself
public_check = true         # no failover while the active still answers on the public network
self_fence = true           # an active cut off from every channel and witness turns passive
witnesses = []              # "IP" (ICMP echo) or "IP:PORT" (TCP): the gateway, for example
network_switchover = true   # active loses every witness, a passive reaches them: switch over

[public]                    # the identity clients use; the active holds it
hostname = ""               # host name of the active ("" leaves host names alone)
addresses = []              # e.g. [{{ address = "198.51.100.10/24", interface = "eth0" }}]
service_port = 0            # TCP port that answers on the public address (0: ICMP echo)

[hooks]                     # argv lists run around each role change, e.g. [["/usr/local/bin/x"]]
before_active = []
after_active = []
before_passive = []
after_passive = []

[system]                    # outside the protected set: compared by drift, copied by reclone
trees = ["/etc", "/opt", "/usr/local"]
packages = "auto"           # dpkg | rpm | auto | none
# exclude = ["/etc/mtab", "*.swp"]                  # neither compared nor copied
# preserve = ["/etc/hostname", "/etc/machine-id"]   # each node's own (see the README's defaults)

[patch]                     # `stead patch`: how a command reaches a node's management identity
connect = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "root@{{host}}"]
command = ""                # default patch command, e.g. "apt-get -y upgrade"
switch_back = false         # switch back to the original active at the end

# [[services]]              # protected services, started in this order on the active only
# name = "web"
# unit = "nginx.service"    # or exec = [argv] (supervised) or start/stop/status = [argv]
# [[services.checks]]
# kind = "http"             # systemd | tcp | http | command
# url = "http://127.0.0.1/"
# actions = ["restart", "restart", "switchover"]

{protected}
{node_blocks}"""


def render_node(name: str) -> str:
    return f"""\
# Node-local Stead configuration: which node this machine is. Not shared.
node = {_q(name)}
cert = "node.pem"
key = "node.key"
ca = "ca.pem"
state_dir = "/var/lib/stead"
api_socket = "/run/stead/agent.sock"
"""


def create_cluster(
    out: Path,
    *,
    cluster_name: str,
    nodes: list[NodeSpec],
    active: str | None,
    protect: list[str],
    force: bool = False,
) -> Path:
    """Write ``out/cluster.toml``, the CA and ``out/nodes/<name>/`` for every node.

    The CA key stays in ``out`` (keep it offline: it is only needed to add nodes).
    """
    if len(nodes) < 2:
        raise UsageError("a cluster needs at least two --node NAME=ADDRESS")
    active = active or nodes[0].name
    if active not in [n.name for n in nodes]:
        raise UsageError(f"--active {active!r} is not one of the nodes")
    if not protect:
        raise UsageError("name at least one --protect PATH")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki.create_ca(cluster_name)
    (out / "ca.pem").write_bytes(ca_cert)
    pki.write_private(out / "ca.key", ca_key)
    cluster_text = render_cluster(cluster_name, str(uuid.uuid4()), active, nodes, protect)
    (out / CLUSTER_FILE).write_text(cluster_text)
    for spec in nodes:
        node_dir = out / "nodes" / spec.name
        node_dir.mkdir(parents=True)
        cert, key = pki.issue_node_cert(ca_cert, ca_key, spec.name, spec.addresses)
        (node_dir / "node.pem").write_bytes(cert)
        pki.write_private(node_dir / "node.key", key)
        (node_dir / "ca.pem").write_bytes(ca_cert)
        (node_dir / CLUSTER_FILE).write_text(cluster_text)
        (node_dir / NODE_FILE).write_text(render_node(spec.name))
        load(node_dir)  # what we wrote must pass `stead config check`
    return out
