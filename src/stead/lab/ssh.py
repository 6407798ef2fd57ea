"""Management access in the lab: an OpenSSH server in every node, a client that logs in.

Each node runs ``/usr/sbin/sshd`` inside all its namespaces (like its agent, but in its own
session, so that ``stead lab kill`` of the agent leaves it running), listening on the node's
management address (its public-network address, port 22) and on the service address,
which only the active holds, so that the public name logs in to the active. Every node has
its own host key, generated once into ``DIR/<node>/ssh``; the lab's client key pair lives in
``DIR/client`` and is authorised for root through a lab-specific ``AuthorizedKeysFile``.

The client namespace resolves every node's management names through
``/etc/netns/stead-client/hosts``, which ``ip netns exec`` binds over ``/etc/hosts`` (the lab
knows them without any agent), and the public names through the lab's DNS server
(``stead.lab.dns``), where the active agent publishes them. ``DIR/client/ssh_config`` pins
host keys: the lab wrote them, so a client never has to trust a key on first use.

Timing duties: ``prepare_node`` and ``prepare_client`` only write files (keys once, the rest
on every ``up``, each written atomically); the caller starts sshd and waits for its pid file,
which sshd writes only after it listens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from stead.errors import LabError
from stead.lab import netns, procs
from stead.lab.config import LAB_DOMAIN, PUBLIC_HOSTNAME, NodePaths

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
KEY_TYPE = "ed25519"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it
NETNS_ETC = Path("/etc/netns")
SSHD_CONFIG_NAME = "sshd_config"
SSHD_TIMEOUT = 15.0


# -- names --------------------------------------------------------------------------------


def management_names(node: str) -> list[str]:
    """The node's own names, as its management identity has them (see ``lab_settings``)."""
    return [f"{node}.{LAB_DOMAIN}", node, node.upper()[:15]]


def public_names() -> list[str]:
    return [f"{PUBLIC_HOSTNAME}.{LAB_DOMAIN}", PUBLIC_HOSTNAME]


def hosts_text(addresses: Mapping[str, str]) -> str:
    """The client's ``/etc/hosts``: ``addresses`` maps node names to management addresses.

    Not the public names: they come from DNS, and follow the active there."""
    lines = ["127.0.0.1\tlocalhost"]
    lines += [f"{address}\t{' '.join(management_names(n))}" for n, address in addresses.items()]
    return "".join(line + "\n" for line in lines)


def client_hosts_file() -> Path:
    return NETNS_ETC / netns.client_netns() / "hosts"


def write_client_hosts(addresses: Mapping[str, str]) -> None:
    path = client_hosts_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, hosts_text(addresses), 0o644)


def remove_client_hosts() -> None:
    path = client_hosts_file()
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: someone else's files stay
        path.parent.rmdir()


# -- files ----------------------------------------------------------------------------------


class ClientFiles:
    """The client's side, in ``DIR/client``: key pair, ssh_config and two known_hosts."""

    def __init__(self, lab_dir: Path) -> None:
        self.dir = lab_dir / netns.CLIENT

    @property
    def key(self) -> Path:
        return self.dir / f"id_{KEY_TYPE}"

    @property
    def public_key(self) -> Path:
        return self.dir / f"id_{KEY_TYPE}.pub"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def public_known_hosts(self) -> Path:
        return self.dir / "known_hosts.public"


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    netns.run(["ssh-keygen", "-q", "-t", KEY_TYPE, "-N", "", "-C", comment, "-f", str(path)])


def _public_key(path: Path) -> str:
    """``TYPE BASE64`` of a ``.pub`` file, without its comment."""
    return " ".join(path.read_text().split()[:2])


def _quote(path: Path) -> str:
    return f'"{path}"'


def prepare_client(lab_dir: Path) -> ClientFiles:
    """The client's key pair (generated once)."""
    files = ClientFiles(lab_dir)
    _keygen(files.key, f"stead-lab-client@{lab_dir}")
    return files


def sshd_config_text(name: str, paths: NodePaths, address: str) -> str:
    return "\n".join(
        [
            f"# Written by `stead lab up`: the management SSH server of lab node {name}.",
            f"ListenAddress {address}:{SSH_PORT}",
            "# The public name reaches the active: every node listens on the service address,",
            "# which only the active holds (ip_nonlocal_bind lets the others bind it).",
            f"ListenAddress {netns.SERVICE_ADDRESS}:{SSH_PORT}",
            f"HostKey {_quote(paths.ssh_host_key)}",
            f"PidFile {_quote(paths.sshd_pid_file)}",
            f"AuthorizedKeysFile {_quote(paths.ssh_authorized_keys)}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "# The lab directory may lie under /tmp (world-writable), which StrictModes refuses.",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def prepare_node(name: str, paths: NodePaths, address: str, client: ClientFiles) -> None:
    """The node's host key (generated once), authorised keys and sshd_config."""
    if not Path(SSHD).exists():
        raise LabError(f"{SSHD} is missing: install openssh-server (`make sysdeps`)")
    _keygen(paths.ssh_host_key, f"root@{name}.{LAB_DOMAIN}")
    _write(paths.ssh_authorized_keys, client.public_key.read_text(), 0o644)
    _write(paths.sshd_config, sshd_config_text(name, paths, address))
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)


def write_client_config(client: ClientFiles, nodes: Mapping[str, tuple[str, NodePaths]]) -> None:
    """``ssh_config`` and known_hosts for ``nodes`` (name to management address and paths).

    Each node's management names are known with its own host key. The public name moves
    with the active role, and in the lab every node has its own host key, so the public
    name is known with every node's key, in a file of its own (one line per node: ssh
    accepts any key listed for a name). A real cluster would give its nodes one shared
    public host key (or host certificates), so that clients pin a single key for it.
    """
    keys = {name: _public_key(paths.ssh_host_key_pub) for name, (_, paths) in nodes.items()}
    own = [
        f"{','.join(dict.fromkeys([*(n.lower() for n in management_names(name)), address]))}"
        f" {keys[name]}"
        for name, (address, _) in nodes.items()
    ]
    public = ",".join([*public_names(), netns.SERVICE_ADDRESS])
    _write(client.known_hosts, "".join(f"{line}\n" for line in own), 0o644)
    _write(client.public_known_hosts, "".join(f"{public} {key}\n" for key in keys.values()), 0o644)
    public_hosts = " ".join([*public_names(), netns.SERVICE_ADDRESS])
    text = f"""\
# Written by `stead lab up`: `stead lab ssh NAME` logs in from the client namespace.
# The public name moves with the active role and each lab node has its own host key, so it
# is known with every node's key (a real cluster shares one public host key instead).
Host {public_hosts}
    UserKnownHostsFile {_quote(client.public_known_hosts)}
    StrictHostKeyChecking yes

Host *
    User root
    IdentityFile {_quote(client.key)}
    IdentitiesOnly yes
    UserKnownHostsFile {_quote(client.known_hosts)}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking accept-new
    UpdateHostKeys no
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
"""
    _write(client.ssh_config, text, 0o644)


def ssh_argv(client: ClientFiles, host: str, command: list[str]) -> list[str]:
    """``ssh`` from the client namespace (to be prefixed with ``ip netns exec``)."""
    argv = ["ssh", "-F", str(client.ssh_config), "-i", str(client.key)]
    return [*argv, "--", f"root@{host}", *command]


def sshd_argv(paths: NodePaths) -> list[str]:
    """sshd in the foreground (``-D``, logging to stderr), so that it stays our process."""
    return [SSHD, "-D", "-e", "-f", str(paths.sshd_config)]


def start_sshd(
    name: str, paths: NodePaths, in_node: Callable[[list[str]], list[str]]
) -> procs.ProcRef:
    """Start the node's sshd (``in_node`` prefixes a command to run inside the node) in a
    session of its own, and wait until it listens (its pid file appears)."""
    netns.run([SSHD, "-t", "-f", str(paths.sshd_config)])  # a clear error before starting
    paths.sshd_pid_file.unlink(missing_ok=True)
    procs.spawn_detached(in_node(sshd_argv(paths)), log_path=paths.sshd_log)

    def pid() -> int | None:
        try:
            return int(paths.sshd_pid_file.read_text())
        except (OSError, ValueError):  # not written yet, or half-written
            return None

    if not procs.wait_until(lambda: pid() is not None, SSHD_TIMEOUT):
        raise LabError(f"sshd of {name} did not start; see {paths.sshd_log}")
    ref = procs.ProcRef.of(pid() or 0)
    if ref is None:
        raise LabError(f"sshd of {name} exited at once; see {paths.sshd_log}")
    return ref


def stop_sshd(ref: procs.ProcRef | None) -> None:
    """End the listener (sessions run in their own sessions; ``down`` ends them with the
    node's namespaces)."""
    if ref is not None and ref.alive():
        procs.kill_group(ref)


def sshd_processes(lab_dir: str | None = None) -> list[int]:
    """Lab sshd listeners (of the lab at ``lab_dir``, or of every lab), found by the
    configuration they were started with, for when their namespace is already gone."""
    found = []
    for pid in procs.pids():
        argv = procs.cmdline(pid)
        if len(argv) == 1 and argv[0].startswith("sshd: "):
            # The listener retitles itself: "sshd: /usr/sbin/sshd -D ... [listener] ...".
            argv = argv[0].removeprefix("sshd: ").split()
        if len(argv) < 2 or argv[0] != SSHD or "-f" not in argv[:-1]:
            continue
        config = Path(argv[argv.index("-f") + 1])
        node_dir = config.parent.parent
        if config.name != SSHD_CONFIG_NAME or not (node_dir / ".stead-lab-node").exists():
            continue
        if lab_dir is None or str(node_dir.parent) == lab_dir:
            found.append(pid)
    return found
