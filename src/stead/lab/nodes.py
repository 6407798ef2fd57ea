"""The lab: several Stead hosts on one machine, as Linux namespaces.

Each node is a network namespace on two shared bridges (the channel network and the public
network, see ``stead.lab.netns``), a UTS namespace with the node's host name, and a mount
namespace where the protected path ``/srv/lab`` is the node's own ext4 file system (a sparse
image, loop-mounted). A client namespace sits on the public network only. A holder process
keeps a node's namespaces alive (see ``stead.lab.holder``); the node's agent and every
command for the node enter them with ``nsenter -t HOLDER -m -u -n``; so does its management
SSH server (see ``stead.lab.ssh``), in a session of its own. The lab's DNS server, authoritative
for ``lab.test``, has a namespace of its own (see ``stead.lab.dns``). Configuration, state
and the agent's API socket stay on the host disk under ``DIR/<node>``, so the host reaches
them directly.

Timing duties: ``up``, ``start`` and ``stop`` wait, within bounds, for what they started or
stopped to be observable (pid files, the agent's socket accepting, processes gone); they
never sleep for a fixed time. Atomicity: ``lab.json`` is replaced atomically, and changes to
one lab are serialised by a lock file, so two ``stead lab`` commands cannot interleave.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from stead.errors import LabError
from stead.lab import cleanup, netns, procs, ssh, state
from stead.lab import dns as labdns
from stead.lab.config import NodePaths, Timing, write_cluster_config
from stead.lab.disk import FILL_FILE, FILL_SCRIPT, make_image, parse_size
from stead.lab.state import LabState, NodeState
from stead.lab.status import describe

log = logging.getLogger(__name__)

DEFAULT_LAB_DIR = Path("/var/lib/stead-lab")
LAB_DIR_ENV = "STEAD_LAB_DIR"
AGENT_CMD_ENV = "STEAD_LAB_AGENT_CMD"
WAIT_READY_ENV = "STEAD_LAB_WAIT_READY"
PROTECT = "/srv/lab"
FIRST_NAMES = ("primary", "secondary", "tertiary")
HOLDER_TIMEOUT = 15.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
NETWORKS = ("channel", "public")
Network = Literal["channel", "public", "all"]


def node_names(count: int) -> list[str]:
    """primary, secondary, tertiary, node4, node5, ..."""
    if count < 1:
        raise LabError("a lab needs at least one node")
    return [FIRST_NAMES[i] if i < len(FIRST_NAMES) else f"node{i + 1}" for i in range(count)]


def default_dir() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def find_lab() -> Lab | None:
    """The lab at ``$STEAD_LAB_DIR`` (or the default directory), if one is up there."""
    lab = Lab(default_dir())
    return lab if (lab.dir / state.STATE_FILE).exists() else None


def down_all(*more_dirs: Path | None) -> list[str]:
    """Take down every lab of this machine: known ones properly, then leftovers by name."""
    _require_root()
    for candidate in {default_dir(), cleanup.owner(), *more_dirs}:
        if candidate is not None and (candidate / state.STATE_FILE).exists():
            Lab(candidate).down()
    return cleanup.sweep_all()


class Lab:
    """One lab, kept in a directory (``DIR/lab.json`` and ``DIR/<node>/``).

    ``agent_cmd`` replaces the real agent (default: ``$STEAD_LAB_AGENT_CMD``); it is a command
    line where ``{python}``, ``{node}``, ``{address}``, ``{socket}``, ``{config_dir}``,
    ``{state_dir}`` and ``{dir}`` are replaced. ``wait_ready`` makes ``up``/``start`` wait
    for the agent's socket; by default only for the real agent (or ``$STEAD_LAB_WAIT_READY``).
    Both are recorded by ``up`` and reused by later ``start`` calls. ``skip_init`` skips
    ``stead init`` (default: ``$STEAD_LAB_SKIP_INIT``). ``heartbeat`` and
    ``failover_timeout`` set the failover timing of the cluster configuration (see ``up``).

    Besides its nodes, a lab has a client: the network namespace ``stead-client``, on the
    public network only, named ``client`` in ``command``, ``exec`` and ``popen``.
    """

    def __init__(
        self,
        dir: Path | str | None = None,
        *,
        agent_cmd: str | None = None,
        wait_ready: bool | None = None,
        skip_init: bool | None = None,
        heartbeat: float | None = None,
        failover_timeout: float | None = None,
    ) -> None:
        self.dir = Path(os.path.abspath(dir if dir is not None else default_dir()))
        self._agent_cmd = agent_cmd if agent_cmd is not None else os.environ.get(AGENT_CMD_ENV)
        self._wait_ready = wait_ready
        self._skip_init = skip_init
        self._heartbeat = heartbeat
        self._failover_timeout = failover_timeout

    def __repr__(self) -> str:
        return f"Lab({str(self.dir)!r})"

    # -- state ---------------------------------------------------------------------------

    def _state(self) -> LabState:
        current = state.load(self.dir)
        if current is None:
            raise LabError(f"no lab is up in {self.dir} (run `stead lab up --dir {self.dir}`)")
        return current

    def _node(self, name: str) -> NodeState:
        current = self._state()
        if name not in current.nodes:
            raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(current.nodes)})")
        return current.nodes[name]

    def paths(self, name: str) -> NodePaths:
        return NodePaths(self.dir / name)

    @property
    def nodes(self) -> list[str]:
        current = state.load(self.dir)
        return list(current.nodes) if current else []

    def addresses(self) -> dict[str, str]:
        return {name: node.address for name, node in self._state().nodes.items()}

    def socket_path(self, name: str) -> Path:
        self._node(name)
        return self.paths(name).socket

    def active_socket(self) -> Path:
        """API socket of the node whose agent says it is active.

        Each agent is asked (briefly); when none answers as active, the node configured as
        active, so that a command run while agents are down still names a sensible node.
        """
        from stead.cli.client import AgentClient
        from stead.errors import SteadError

        current = self._state()
        for name in current.nodes:
            socket_path = self.socket_path(name)
            if not socket_path.exists():
                continue
            try:
                status = AgentClient(socket_path, timeout=2.0).call("GET", "/v1/status")
            except SteadError:
                continue
            if isinstance(status, dict) and status.get("role") == "active":
                return socket_path
        return self.socket_path(current.active)

    def node_fs_path(self, name: str) -> Path:
        """The node's protected path as seen from the host (through its holder's root)."""
        holder = self._node(name).holder
        if holder is None or not holder.alive():
            raise LabError(f"node {name} is not running (its holder is gone)")
        return Path(f"/proc/{holder.pid}/root{PROTECT}")

    # -- up and down ---------------------------------------------------------------------

    def up(
        self,
        n: int = 3,
        disk_size: str = "2G",
        *,
        heartbeat: float | None = None,
        failover_timeout: float | None = None,
    ) -> dict[str, Any]:
        """Build the lab with ``n`` nodes, or complete it: running pieces are kept.

        ``heartbeat`` and ``failover_timeout`` (seconds) go into every node's configuration
        (``channel.heartbeat``, ``failover.timeout``); given here or to the constructor, they
        are recorded, and a later ``up`` without them keeps them. Agents whose configuration
        files changed are restarted, since they read them only when they start.
        """
        _require_root()
        names = node_names(n)
        parse_size(disk_size)
        with state.locked(self.dir):
            self._check_owner()
            current = state.load(self.dir) or LabState(dir=str(self.dir))
            current.disk_size = disk_size
            real_agent = not self._agent_cmd
            current.agent_cmd = self._agent_cmd or None
            env_wait = os.environ.get(WAIT_READY_ENV, "") not in ("", "0")
            current.wait_ready = (
                self._wait_ready if self._wait_ready is not None else real_agent or env_wait
            )
            current.heartbeat = _first(heartbeat, self._heartbeat, current.heartbeat)
            current.failover_timeout = _first(
                failover_timeout, self._failover_timeout, current.failover_timeout
            )
            extras = [current.nodes.pop(name) for name in list(current.nodes) if name not in names]
            for index, name in enumerate(names):
                old = current.nodes.get(name)
                if old is None or old.index != index:
                    old = current.nodes[name] = NodeState(
                        name=name,
                        index=index,
                        address=netns.node_address(index),
                        netns=netns.netns_name(name),
                        veth=netns.veth_name(name, index),
                    )
                # Derived by convention; also fills in state of labs older than pub0.
                old.public_address = netns.node_public_address(index)
                old.pub_veth = netns.pub_veth_name(name, index)
            # The configuration first: a setting it refuses changes nothing that runs.
            changed = write_cluster_config(
                self.dir,
                self.addresses_of(current),
                {name: self.paths(name) for name in names},
                active=current.active,
                protect=current.protect,
                skip=self._skip_init,
                timing=Timing(current.heartbeat, current.failover_timeout),
                dns=labdns.cluster_settings(self.dir),
            )
            for extra in extras:
                self._teardown(extra)
            cleanup.claim(self.dir)
            netns.ensure_bridges()
            if not netns.client_network_ok():
                cleanup.teardown_client()
                netns.create_client_network()
            # Before any agent: each registers its management name once, when it starts.
            if not labdns.server_ok(self.dir):
                labdns.stop_server(self.dir)
                cleanup.teardown_dns()
                labdns.start_server(self.dir)
            labdns.write_client_resolver()
            client = ssh.prepare_client(self.dir)
            for name in names:
                node = current.nodes[name]
                self._ensure_node(current, node)
                state.save(self.dir, current)  # `command` finds the node's holder there
                ssh.prepare_node(name, self.paths(name), node.public_address, client)
                self._ensure_sshd(node)
                state.save(self.dir, current)
            management = {name: current.nodes[name].public_address for name in names}
            ssh.write_client_config(client, {n: (a, self.paths(n)) for n, a in management.items()})
            ssh.write_client_hosts(management)
            for name in names:
                node = current.nodes[name]
                if name in changed:
                    self._stop_agent(node, STOP_TIMEOUT)  # it has the old configuration
                self._ensure_agent(current, node)
                state.save(self.dir, current)
            if current.wait_ready:
                for name in names:
                    self._wait_ready_socket(current.nodes[name])
        return self.status()

    @staticmethod
    def addresses_of(current: LabState) -> dict[str, str]:
        return {name: node.address for name, node in current.nodes.items()}

    def down(self) -> None:
        """Remove every process, namespace, mount, loop device and link of this lab.

        Files (disk images, configuration, state) stay, so that ``up`` finds them again.
        """
        _require_root()
        with state.locked(self.dir):
            current = state.load(self.dir)
            nodes = list(current.nodes.values()) if current else []
            for node in nodes:
                self._teardown(node)
            labdns.stop_server(self.dir)
            stray = procs.holder_processes(str(self.dir)) + ssh.sshd_processes(str(self.dir))
            stray += labdns.named_processes(str(self.dir))
            if stray:
                procs.kill_pids(stray)
            cleanup.teardown_client()
            cleanup.teardown_dns()
            labdns.remove_client_resolver()
            ssh.remove_client_hosts()
            if not [link for link in netns.list_lab_links() if link not in netns.BRIDGES]:
                netns.remove_bridges()
                netns.clear_drop()
            cleanup.remove_mount_points()
            state.remove(self.dir)
            cleanup.release(self.dir)

    def _check_owner(self) -> None:
        other = cleanup.owner()
        if other is not None and other != self.dir and netns.list_netns():
            raise LabError(
                f"another lab is up in {other}; take it down first"
                f" (`stead lab down --dir {other}` or `stead lab down --all`)"
            )

    def _teardown(self, node: NodeState) -> None:
        ssh.stop_sshd(node.sshd)
        node.set_sshd(None)
        veths = [node.veth, node.pub_veth]
        cleanup.teardown_node(node.netns, veths, self.paths(node.name).root, [node.holder])
        node.set_holder(None)
        node.set_agent(None)

    def _ensure_node(self, current: LabState, node: NodeState) -> None:
        holder = node.holder
        if (
            holder is not None
            and holder.alive()
            and netns.node_network_ok(node.name, node.index, node.address, node.public_address)
        ):
            return
        self._teardown(node)
        paths = self.paths(node.name)
        if not paths.image.exists():
            make_image(paths.image, parse_size(current.disk_size), node.name)
        if not paths.system_image.exists():
            make_image(paths.system_image, parse_size(current.disk_size), f"sys-{node.name}")
        netns.create_node_network(node.name, node.index, node.address, node.public_address)
        node.set_holder(self._start_holder(node, paths))

    def _start_holder(self, node: NodeState, paths: NodePaths) -> procs.ProcRef:
        failed = paths.holder_pid_file.with_suffix(".failed")
        for stale in (paths.holder_pid_file, failed):
            stale.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", node.netns]
        argv += ["unshare", "--mount", "--uts", "--propagation", "private", "--"]
        argv += [sys.executable, "-m", procs.HOLDER_MARKER, f"--lab-dir={self.dir}"]
        argv += [f"--node={node.name}", f"--image={paths.image}", f"--mountpoint={PROTECT}"]
        argv += [f"--system-image={paths.system_image}", f"--system-mount={paths.system_mount}"]
        argv += [f"--pid-file={paths.holder_pid_file}"]
        procs.spawn_detached(argv, log_path=paths.holder_log)
        if not procs.wait_until(
            lambda: paths.holder_pid_file.exists() or failed.exists(), HOLDER_TIMEOUT
        ):
            raise LabError(f"node {node.name} did not come up; see {paths.holder_log}")
        if failed.exists():
            raise LabError(f"node {node.name} failed: {failed.read_text().strip()}")
        ref = procs.ProcRef.of(int(paths.holder_pid_file.read_text()))
        if ref is None:
            raise LabError(f"the holder of node {node.name} died; see {paths.holder_log}")
        return ref

    def _ensure_sshd(self, node: NodeState) -> None:
        """The node's management SSH server, in a session of its own: `kill` of the agent's
        process group leaves it running; `down` ends it with the node."""
        sshd = node.sshd
        if sshd is None or not sshd.alive():
            paths = self.paths(node.name)
            node.set_sshd(ssh.start_sshd(node.name, paths, lambda a: self.command(node.name, a)))

    # -- agents --------------------------------------------------------------------------

    def _agent_argv(self, current: LabState, node: NodeState) -> list[str]:
        paths = self.paths(node.name)
        if not current.agent_cmd:
            return [sys.executable, "-m", "stead", "agent", "--config-dir", str(paths.etc)]
        words = {
            "{python}": sys.executable,
            "{node}": node.name,
            "{address}": node.address,
            "{socket}": str(paths.socket),
            "{config_dir}": str(paths.etc),
            "{state_dir}": str(paths.state),
            "{dir}": str(self.dir),
        }
        argv = shlex.split(current.agent_cmd)
        for key, value in words.items():
            argv = [arg.replace(key, value) for arg in argv]
        return argv

    def _ensure_agent(self, current: LabState, node: NodeState) -> None:
        agent = node.agent
        if agent is not None and agent.alive():
            return
        paths = self.paths(node.name)
        paths.agent_pid_file.unlink(missing_ok=True)
        paths.socket.unlink(missing_ok=True)
        # The shell reports its pid (which setsid made a session and group leader), then
        # becomes the agent: the pid file names the agent's process group.
        report = 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec "$@"'
        argv = self.command(node.name, ["sh", "-c", report, str(paths.agent_pid_file)])
        argv += self._agent_argv(current, node)
        with open(paths.agent_log, "ab") as out:
            out.write(f"--- starting: {shlex.join(argv)}\n".encode())
        procs.spawn_detached(argv, log_path=paths.agent_log, env=self.node_env(node.name))
        if not procs.wait_until(paths.agent_pid_file.exists, HOLDER_TIMEOUT):
            raise LabError(f"the agent of {node.name} did not start; see {paths.agent_log}")
        ref = procs.ProcRef.of(int(paths.agent_pid_file.read_text()))
        if ref is None:
            raise LabError(f"the agent of {node.name} exited at once; see {paths.agent_log}")
        node.set_agent(ref)

    def _wait_ready_socket(self, node: NodeState) -> None:
        paths = self.paths(node.name)

        def ready() -> bool:
            agent = node.agent
            if agent is None or not agent.alive():
                tail = _tail(paths.agent_log)
                raise LabError(f"the agent of {node.name} exited before it was ready:\n{tail}")
            return _socket_accepts(paths.socket)

        if not procs.wait_until(ready, READY_TIMEOUT, interval=0.05):
            raise LabError(
                f"the agent of {node.name} did not open {paths.socket} within"
                f" {READY_TIMEOUT:.0f} s; see {paths.agent_log}"
            )

    def start(self, name: str) -> None:
        """Start the node's agent again (no-op if it runs)."""
        with state.locked(self.dir):
            current = self._state()
            node = self._node_in(current, name)
            holder = node.holder
            if holder is None or not holder.alive():
                raise LabError(f"node {name} is down; run `stead lab up` to rebuild it")
            self._ensure_sshd(node)
            self._ensure_agent(current, node)
            state.save(self.dir, current)
        if current.wait_ready:
            self._wait_ready_socket(node)

    def stop(self, name: str, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the agent's process group; SIGKILL it if it outlives ``timeout``."""
        self._stop_agent(self._node(name), timeout)

    @staticmethod
    def _stop_agent(node: NodeState, timeout: float) -> None:
        agent = node.agent
        if agent is None or not procs.signal_group(agent, signal.SIGTERM):
            return
        procs.signal_group(agent, signal.SIGCONT)  # a frozen agent (sigstop) must see it
        if not procs.wait_until(lambda: not procs.group_members(agent.pid), timeout):
            log.warning("agent of %s ignored SIGTERM for %.0f s; killing it", node.name, timeout)
            procs.kill_group(agent)

    def kill(self, name: str) -> None:
        """SIGKILL the agent and everything in its process group."""
        agent = self._node(name).agent
        if agent is not None:
            procs.kill_group(agent)

    @staticmethod
    def _node_in(current: LabState, name: str) -> NodeState:
        if name not in current.nodes:
            raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(current.nodes)})")
        return current.nodes[name]

    # -- commands in a node --------------------------------------------------------------

    def command(self, name: str, argv: Sequence[str], *, cwd: str | None = None) -> list[str]:
        """``argv`` prefixed so that it runs inside the node's namespaces.

        For ``client``, inside the client's network namespace (the working directory stays).
        """
        if name == netns.CLIENT:
            self._state()
            if not netns.netns_exists(netns.client_netns()):
                raise LabError("the lab has no client namespace; run `stead lab up`")
            return ["ip", "netns", "exec", netns.client_netns(), *argv]
        holder = self._node(name).holder
        if holder is None or not holder.alive():
            raise LabError(f"node {name} is not running; run `stead lab up`")
        prefix = ["nsenter", "-t", str(holder.pid), "-m", "-u", "-n"]
        if cwd is not None:
            prefix.append(f"--wd={cwd}")
        return [*prefix, "--", *argv]

    def node_env(self, name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for commands in the node: the stead CLI finds the node's config."""
        env = dict(os.environ)
        env.pop(AGENT_CMD_ENV, None)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        if name != netns.CLIENT:  # the client is no node: it has no configuration
            env["STEAD_CONFIG_DIR"] = str(self.paths(name).etc)
        env["STEAD_LAB_NODE"] = name
        env[LAB_DIR_ENV] = str(self.dir)
        env.update(extra or {})
        return env

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        capture: bool = False,
        input: str | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node; stdin/stdout pass through unless ``capture``."""
        return subprocess.run(
            self.command(name, argv, cwd=cwd),
            env=self.node_env(name, env),
            capture_output=capture,
            input=input,
            timeout=timeout,
            text=True,
            check=check,
        )

    def ssh_command(self, host: str, command: Sequence[str] = ()) -> list[str]:
        """``ssh root@HOST COMMAND`` from the client namespace, where HOST resolves through
        the hosts file the lab manages (management names) and the lab's DNS server (public
        names)."""
        return self.command(netns.CLIENT, ssh.ssh_argv(ssh.ClientFiles(self.dir), host, [*command]))

    def ssh(
        self, host: str, command: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Log in to ``host`` from the client and run ``command`` (output captured)."""
        return subprocess.run(
            self.ssh_command(host, command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.node_env(netns.CLIENT),
        )

    def popen(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the node in the background (the caller waits for it)."""
        kwargs.setdefault("env", self.node_env(name))
        return subprocess.Popen(self.command(name, argv), **kwargs)

    # -- network faults ------------------------------------------------------------------

    def partition(self, name: str, network: Network = "all") -> None:
        """Cut the node off the channel network, the public network, or both ("all"): the
        host-side veth on that bridge goes down."""
        for veth in _veths(self._node(name), network).values():
            netns.set_link(veth, up=False)

    def heal(self, name: str | None = None, network: Network = "all") -> None:
        """Reconnect one node, or every node, to the network(s) named."""
        names = [name] if name else list(self._state().nodes)
        for each in names:
            for veth in _veths(self._node(each), network).values():
                netns.set_link(veth, up=True)

    def ping(
        self,
        source: str,
        address: str,
        *,
        timeout: float = 1.0,
        count: int = 1,
        interface: str | None = None,
    ) -> bool:
        """Whether ``address`` answers ICMP echo sent from ``source`` (a node or ``client``)
        within ``count`` tries of ``timeout`` seconds, through ``interface`` if given."""
        argv = [sys.executable, "-m", "stead.lab.ping", address]
        argv += [f"--timeout={timeout}", f"--count={count}"]
        if interface:
            argv.append(f"--interface={interface}")
        return self.exec(source, argv, capture=True, timeout=count * timeout + 30).returncode == 0

    def netem(self, name: str, delay_ms: float = 0, loss_pct: float = 0) -> None:
        """Delay and drop packets towards the node; ``netem(node)`` clears it."""
        netns.set_netem(self._node(name).veth, delay_ms, loss_pct)

    def drop(self, name: str, loss_pct: float) -> None:
        """Drop ``loss_pct`` % of the node's frames at random (nftables; works without
        netem); ``drop(node, 0)`` clears it."""
        netns.set_drop(self._node(name).veth, loss_pct)

    # -- process and disk faults ---------------------------------------------------------

    def sigstop(self, name: str) -> None:
        agent = self._node(name).agent
        if agent is None or not procs.signal_group(agent, signal.SIGSTOP):
            raise LabError(f"the agent of {name} is not running")

    def sigcont(self, name: str) -> None:
        agent = self._node(name).agent
        if agent is None or not procs.signal_group(agent, signal.SIGCONT):
            raise LabError(f"the agent of {name} is not running")

    def fill_disk(self, name: str) -> None:
        """Fill the node's file system (``/srv/lab/.stead-lab-fill``) until it is full."""
        self.exec(name, [sys.executable, "-c", FILL_SCRIPT, PROTECT, FILL_FILE], check=True)

    def free_disk(self, name: str) -> None:
        self.exec(name, ["rm", "-f", f"{PROTECT}/{FILL_FILE}"], check=True)

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the lab is made of and what runs (``stead lab status --json``)."""
        return describe(self.dir, state.load(self.dir), self.paths, PROTECT)


def _veths(node: NodeState, network: str) -> dict[str, str]:
    """The node's host-side veths on ``network``, by network name."""
    if network not in (*NETWORKS, "all"):
        raise LabError(f"no network {network!r} (networks: {', '.join(NETWORKS)}, all)")
    links = {"channel": node.veth, "public": node.pub_veth}
    chosen = {name: veth for name, veth in links.items() if network in (name, "all")}
    if not all(chosen.values()):
        raise LabError(f"node {node.name} has no public link; run `stead lab up` again")
    return chosen


def _first(*values: float | None) -> float | None:
    return next((value for value in values if value is not None), None)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, loop devices, links)")


def _socket_accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
