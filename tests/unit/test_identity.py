"""The identity seam: a conformance suite every backend passes, then what Linux adds to it.

Linux backends run in a worker process inside a network namespace of their own
(``stidt-<pid>-<n>``) and a UTS namespace of their own, held by a ``sleep`` process, so that
the host's addresses and host name are never touched. A crash is a real ``kill -9`` of the
worker; the next worker gets the same state file.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stead.config.schema import ClusterConfig
from stead.identity import (
    CompositeIdentity,
    IdentityBackend,
    IdentityError,
    LinuxHost,
    NullIdentity,
    StateFile,
    make_identity,
)
from stead.identity.linux import gratuitous_arp_frame, neighbour_advertisement

IS_ROOT = os.geteuid() == 0
NETNS_PREFIX = "stidt-"
VETH_PREFIX = "stidv"
PUBLIC_HOSTNAME = "svc.stidt.test"
BEFORE_HOSTNAME = "stidt-before"
SERVICE_V4 = "10.77.0.100/24"
SERVICE_V6 = "2001:db8:77::100/64"
OWN_V4 = "10.77.0.1/24"  # the node's own address, on the interface before any take
CALL_TIMEOUT = 15.0
_names = itertools.count(1)


# A fake backend, for the seam's own stand-ins: the "host" is a dict that outlives instances.


class FakeIdentity(IdentityBackend):
    """Sets ``world[name]``; records the previous value in its state file first."""

    __slots__ = ("_name", "_state", "_world", "events", "fail", "fail_release")

    def __init__(
        self,
        world: dict[str, str],
        name: str,
        state_file: Path,
        *,
        events: list[str] | None = None,
        fail: BaseException | None = None,
    ) -> None:
        self._world, self._name, self._state = world, name, StateFile(state_file)
        self.events = events if events is not None else []
        self.fail = fail
        self.fail_release: BaseException | None = None

    async def take(self) -> None:
        self.events.append(f"take {self._name}")
        state = self._state.load() or {"previous": self._world.get(self._name), "taken": False}
        self._state.save(state)
        if self.fail is not None:
            raise self.fail
        self._world[self._name] = "public"
        self._state.save({**state, "taken": True})

    async def release(self) -> None:
        self.events.append(f"release {self._name}")
        if self.fail_release is not None:
            raise self.fail_release
        state = self._state.load()
        if state is None:
            return
        if state["previous"] is None:
            self._world.pop(self._name, None)
        else:
            self._world[self._name] = state["previous"]
        self._state.clear()

    async def holds(self) -> bool:
        state = self._state.load()
        return bool(state and state["taken"]) and self._world.get(self._name) == "public"

    def describe(self) -> str:
        return f"fake {self._name}"


# Agents: one running agent's backend, reached in process or in a worker process.


class Agent(abc.ABC):
    @abc.abstractmethod
    async def call(self, op: str) -> Any: ...

    @abc.abstractmethod
    async def crash_and_restart(self) -> None:
        """Lose the backend without a release (kill -9), start a new one on the same state."""

    async def take(self) -> None:
        await self.call("take")

    async def release(self) -> None:
        await self.call("release")

    async def holds(self) -> bool:
        return bool(await self.call("holds"))


class InProcessAgent(Agent):
    def __init__(self, build: Callable[[], IdentityBackend]) -> None:
        self.build = build
        self.backend = build()

    async def call(self, op: str) -> Any:
        async with asyncio.timeout(CALL_TIMEOUT):
            return await getattr(self.backend, op)()

    async def crash_and_restart(self) -> None:
        self.backend = self.build()


WORKER = """
import asyncio, json, sys
from pathlib import Path
from stead.config.schema import ClusterConfig, PublicSection
from stead.identity import IdentityError, LinuxHost, make_identity

spec = json.loads(sys.argv[1])
if spec["kind"] == "linux":
    public = PublicSection.model_validate(spec["public"])
    backend = LinuxHost(public, Path(spec["state_dir"]) / "identity-linux.json")
else:
    backend = make_identity(ClusterConfig.model_validate(spec["config"]), Path(spec["state_dir"]))


async def cancelled_take_then_release():
    task = asyncio.create_task(backend.take())
    await asyncio.sleep(0)  # the take's worker thread is started, and outlives the cancel
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await backend.release()


scenarios = {"cancelled_take_then_release": cancelled_take_then_release}
print(json.dumps({"ready": backend.describe()}), flush=True)
for line in sys.stdin:
    op = scenarios.get(line.strip()) or getattr(backend, line.strip())
    try:
        reply = {"ok": True, "result": asyncio.run(op())}
    except IdentityError as exc:
        reply = {"ok": False, "error": str(exc)}
    print(json.dumps(reply), flush=True)
"""


@dataclass
class NetnsHost:
    """A network namespace with a veth pair, and a UTS namespace held by ``holder``."""

    netns: str
    interface: str
    peer: str
    holder: subprocess.Popen[str]

    def run(self, *argv: str) -> str:
        return _run(["nsenter", "-t", str(self.holder.pid), "-n", "-u", "--", *argv])

    def hostname(self) -> str:
        return self.run("hostname").strip()

    def addresses(self, interface: str | None = None) -> set[str]:
        out = _run(
            ["ip", "-n", self.netns, "-j", "addr", "show", "dev", interface or self.interface]
        )
        return {
            f"{info['local']}/{info['prefixlen']}"
            for link in json.loads(out)
            for info in link["addr_info"]
            if not str(info["local"]).startswith("fe80:")
        }

    def mac(self, interface: str | None = None) -> str:
        out = _run(
            ["ip", "-n", self.netns, "-j", "link", "show", "dev", interface or self.interface]
        )
        return str(json.loads(out)[0]["address"])


class WorkerAgent(Agent):
    def __init__(self, host: NetnsHost, spec: dict[str, Any]) -> None:
        self.host, self.spec = host, spec
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *["nsenter", "-t", str(self.host.holder.pid), "-n", "-u", "--"],
            *[sys.executable, "-c", WORKER, json.dumps(self.spec)],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert "ready" in await self._reply()

    async def _reply(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(CALL_TIMEOUT):
            line = await self.proc.stdout.readline()
        assert line, "the identity worker died (its traceback is in the captured stderr)"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, op: str) -> Any:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{op}\n".encode())
        await self.proc.stdin.drain()
        reply = await self._reply()
        if not reply["ok"]:
            raise IdentityError(reply["error"])
        return reply["result"]

    async def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()

    async def crash_and_restart(self) -> None:
        await self.stop()
        await self.start()


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module", autouse=True)
def _stale_namespaces() -> None:
    """Remove namespaces that an earlier, killed run of these tests left behind."""
    if not IS_ROOT or not Path("/run/netns").is_dir():
        return
    for path in Path("/run/netns").glob(f"{NETNS_PREFIX}*"):
        owner = path.name.split("-")[1]
        if owner.isdigit() and not _pid_alive(int(owner)):
            subprocess.run(["ip", "netns", "del", path.name], check=False)


@pytest.fixture
def netns_hosts() -> Iterator[Callable[[], NetnsHost]]:
    """Make namespaced hosts; each is removed at the end, whatever happened."""
    made: list[NetnsHost | str] = []

    def make() -> NetnsHost:
        if not IS_ROOT:
            pytest.skip("network namespaces need root")
        n = next(_names)
        netns = f"{NETNS_PREFIX}{os.getpid()}-{n}"
        tag = f"{os.getpid() % 100000:05d}{n % 100:02d}"
        interface, peer = f"{VETH_PREFIX}{tag}a", f"{VETH_PREFIX}{tag}b"
        _run(["ip", "netns", "add", netns])
        made.append(netns)
        _run(["ip", "-n", netns, "link", "add", interface, "type", "veth", "peer", "name", peer])
        for name in (interface, peer, "lo"):
            _run(["ip", "-n", netns, "link", "set", name, "up"])
        _run(["ip", "-n", netns, "addr", "add", OWN_V4, "dev", interface])
        holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "--", "sh", "-c",
             f"hostname {BEFORE_HOSTNAME} && echo ready && exec sleep 3600"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        host = NetnsHost(netns, interface, peer, holder)
        made.append(host)
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        # Never let a test touch the host name of the machine itself.
        assert os.readlink(f"/proc/{holder.pid}/ns/uts") != os.readlink("/proc/self/ns/uts")
        assert host.hostname() == BEFORE_HOSTNAME
        return host

    try:
        yield make
    finally:
        for item in reversed(made):
            if isinstance(item, NetnsHost):
                item.holder.kill()
                item.holder.wait()
                if item.holder.stdout is not None:
                    item.holder.stdout.close()
            else:
                subprocess.run(["ip", "netns", "del", item], check=False)


@pytest.fixture
async def workers() -> AsyncIterator[Callable[[NetnsHost, dict[str, Any]], Any]]:
    started: list[WorkerAgent] = []

    async def start(host: NetnsHost, spec: dict[str, Any]) -> WorkerAgent:
        agent = WorkerAgent(host, spec)
        started.append(agent)
        await agent.start()
        return agent

    try:
        yield start
    finally:
        for agent in started:
            await agent.stop()


def _public(interface: str, *addresses: str, hostname: str = PUBLIC_HOSTNAME) -> dict[str, Any]:
    return {
        "hostname": hostname,
        "addresses": [{"address": a, "interface": interface} for a in addresses],
    }


def _cluster(public: dict[str, Any]) -> dict[str, Any]:
    return {
        "cluster": {"name": "t", "id": "0123456789abcdef", "active": "one"},
        "public": public,
        "protected": [{"path": "/srv/data"}],
        "nodes": [
            {"name": "one", "addresses": ["198.18.0.11"]},
            {"name": "two", "addresses": ["198.18.0.12"]},
        ],
    }


def _linux_spec(kind: str, state_dir: Path, public: dict[str, Any]) -> dict[str, Any]:
    if kind == "linux":
        return {"kind": "linux", "public": public, "state_dir": str(state_dir)}
    return {"kind": "configured", "config": _cluster(public), "state_dir": str(state_dir)}


# The conformance suite.

BACKENDS = [
    pytest.param("null", id="null"),
    pytest.param("fake", id="fake"),
    pytest.param("composite-fakes", id="composite-fakes"),
    pytest.param("linux", id="linux", marks=pytest.mark.root),
    pytest.param("configured", id="make_identity", marks=pytest.mark.root),
]
LINUX_BACKENDS = [
    pytest.param("linux", id="linux", marks=pytest.mark.root),
    pytest.param("configured", id="make_identity", marks=pytest.mark.root),
]


@pytest.fixture(params=BACKENDS)
async def agent(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    netns_hosts: Callable[[], NetnsHost],
    workers: Callable[[NetnsHost, dict[str, Any]], Any],
) -> Agent:
    kind = request.param
    world: dict[str, str] = {}
    if kind == "null":
        return InProcessAgent(NullIdentity)
    if kind == "fake":
        return InProcessAgent(lambda: FakeIdentity(world, "name", tmp_path / "fake.json"))
    if kind == "composite-fakes":
        return InProcessAgent(
            lambda: CompositeIdentity(
                [FakeIdentity(world, n, tmp_path / f"{n}.json") for n in ("a", "b")]
            )
        )
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    worker: Agent = await workers(host, _linux_spec(kind, tmp_path, public))
    return worker


async def test_nothing_held_at_first_and_release_is_a_no_op(agent: Agent) -> None:
    assert not await agent.holds()
    await agent.release()
    await agent.release()
    assert not await agent.holds()


async def test_take_is_idempotent_and_release_gives_back(agent: Agent) -> None:
    await agent.take()
    assert await agent.holds()
    await agent.take()
    assert await agent.holds()
    await agent.release()
    assert not await agent.holds()
    await agent.release()
    assert not await agent.holds()
    await agent.take()  # and again, after a full cycle
    assert await agent.holds()
    await agent.release()


async def test_a_restarted_agent_releases_what_a_killed_one_took(agent: Agent) -> None:
    if isinstance(agent, InProcessAgent) and isinstance(agent.backend, NullIdentity):
        pytest.skip("the null identity holds nothing that could outlive the agent")
    await agent.take()
    await agent.crash_and_restart()
    assert await agent.holds()
    await agent.release()
    assert not await agent.holds()
    await agent.crash_and_restart()
    assert not await agent.holds()


# What the Linux host backend does to the host.


@pytest.fixture(params=LINUX_BACKENDS)
def linux_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_linux_take_and_release_restore_exactly(
    linux_kind: str, tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    before = host.addresses()
    assert before == {OWN_V4}
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec(linux_kind, tmp_path, public))
    await agent.take()
    taken = host.addresses()
    assert taken == {OWN_V4, SERVICE_V4, SERVICE_V6}
    assert host.hostname() == PUBLIC_HOSTNAME
    await agent.take()
    assert host.addresses() == taken
    await agent.release()
    assert host.addresses() == before  # the node's own address stays
    assert host.hostname() == BEFORE_HOSTNAME
    assert not (tmp_path / "identity-linux.json").exists()


async def test_linux_release_keeps_a_service_address_that_was_there_before(
    linux_kind: str, tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    _run(["ip", "-n", host.netns, "addr", "add", SERVICE_V4, "dev", host.interface])
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec(linux_kind, tmp_path, public))
    await agent.take()
    assert await agent.holds()
    assert host.addresses() == {OWN_V4, SERVICE_V4, SERVICE_V6}
    await agent.release()
    assert host.addresses() == {OWN_V4, SERVICE_V4}


async def test_linux_kill_9_then_a_new_agent_releases_exactly(
    linux_kind: str, tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec(linux_kind, tmp_path, public))
    await agent.take()
    await agent.crash_and_restart()
    assert host.addresses() == {OWN_V4, SERVICE_V4, SERVICE_V6}
    await agent.take()  # the new agent takes again: the previous host name must survive it
    await agent.release()
    assert host.addresses() == {OWN_V4}
    assert host.hostname() == BEFORE_HOSTNAME


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.005, 0.01, 0.02, 0.05])
async def test_linux_kill_9_at_any_moment_of_a_take_is_undone(
    delay: float, tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec("linux", tmp_path, public))
    assert agent.proc is not None and agent.proc.stdin is not None
    agent.proc.stdin.write(b"take\n")
    await agent.proc.stdin.drain()
    await asyncio.sleep(delay)  # the moment of the crash
    await agent.crash_and_restart()
    await agent.release()
    assert host.addresses() == {OWN_V4}
    assert host.hostname() == BEFORE_HOSTNAME


async def test_linux_crash_in_the_middle_of_a_take_is_undone(
    tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    """The state a take writes before it changes anything is enough to undo it."""
    host = netns_hosts()
    host.run("hostname", PUBLIC_HOSTNAME)  # the host name was set, no address was added yet
    StateFile(tmp_path / "identity-linux.json").save(
        {
            "hostname": {"previous": BEFORE_HOSTNAME, "public": PUBLIC_HOSTNAME},
            "added": [
                {"address": SERVICE_V4, "interface": host.interface},
                {"address": SERVICE_V6, "interface": host.interface},
            ],
            "taken": False,
        }
    )
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec("linux", tmp_path, public))
    assert not await agent.holds()
    await agent.release()
    assert host.addresses() == {OWN_V4}
    assert host.hostname() == BEFORE_HOSTNAME


async def test_linux_a_cancelled_take_then_release_leaves_nothing(
    tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4, SERVICE_V6)
    agent = await workers(host, _linux_spec("linux", tmp_path, public))
    for _ in range(3):
        await agent.call("cancelled_take_then_release")
        assert host.addresses() == {OWN_V4}
        assert host.hostname() == BEFORE_HOSTNAME
        assert not await agent.holds()


async def test_linux_missing_interface_takes_nothing(
    linux_kind: str, tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4)
    public["addresses"].append({"address": "10.78.0.100/24", "interface": "stidvmissing"})
    agent = await workers(host, _linux_spec(linux_kind, tmp_path, public))
    with pytest.raises(IdentityError, match="stidvmissing"):
        await agent.take()
    assert host.addresses() == {OWN_V4}
    assert host.hostname() == BEFORE_HOSTNAME
    assert not await agent.holds()
    assert not (tmp_path / "identity-linux.json").exists()


async def test_linux_a_removed_address_is_not_held_and_take_repairs_it(
    tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    public = _public(host.interface, SERVICE_V4)
    agent = await workers(host, _linux_spec("linux", tmp_path, public))
    await agent.take()
    _run(["ip", "-n", host.netns, "addr", "del", SERVICE_V4, "dev", host.interface])
    assert not await agent.holds()
    await agent.take()
    assert await agent.holds()
    assert host.addresses() == {OWN_V4, SERVICE_V4}


async def test_linux_a_new_configuration_drops_addresses_of_the_old(
    tmp_path: Path, netns_hosts: Callable[[], NetnsHost], workers: Any
) -> None:
    host = netns_hosts()
    old = await workers(host, _linux_spec("linux", tmp_path, _public(host.interface, SERVICE_V4)))
    await old.take()
    await old.stop()
    new_public = _public(host.interface, SERVICE_V6, hostname="")
    new = await workers(host, _linux_spec("linux", tmp_path, new_public))
    await new.take()
    assert host.addresses() == {OWN_V4, SERVICE_V6}
    assert host.hostname() == BEFORE_HOSTNAME
    await new.release()
    assert host.addresses() == {OWN_V4}


# Announcements: a neighbour that knew the old active's MAC learns ours.

STALE_MAC = "02:00:00:00:00:01"


@pytest.mark.root
@pytest.mark.parametrize(
    ("service", "peer_address"),
    [
        pytest.param(SERVICE_V4, "10.77.0.2/24", id="gratuitous-arp"),
        pytest.param(SERVICE_V6, "2001:db8:77::2/64", id="neighbour-advertisement"),
    ],
)
async def test_take_announces_the_address_to_neighbours(
    service: str,
    peer_address: str,
    tmp_path: Path,
    netns_hosts: Callable[[], NetnsHost],
    workers: Any,
) -> None:
    a, b = netns_hosts(), netns_hosts()
    # Move A's veth peer into B: A and B are now on one link.
    _run(["ip", "-n", a.netns, "link", "set", a.peer, "netns", b.netns])
    _run(["ip", "-n", b.netns, "link", "set", a.peer, "up"])
    _run(["ip", "-n", b.netns, "addr", "add", peer_address, "dev", a.peer, "nodad"])
    ip = str(ipaddress.ip_interface(service).ip)
    _run(["ip", "-n", b.netns, "neigh", "replace", ip, "lladdr", STALE_MAC, "dev", a.peer,
          "nud", "stale"])  # fmt: skip
    assert _neighbour_mac(b, ip, a.peer) == STALE_MAC
    agent = await workers(a, _linux_spec("linux", tmp_path, _public(a.interface, service)))
    await agent.take()
    expected = a.mac()
    await _eventually(lambda: _neighbour_mac(b, ip, a.peer) == expected, within=2.0)
    await agent.release()


async def _eventually(check: Callable[[], bool], *, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


def _neighbour_mac(host: NetnsHost, ip: str, interface: str) -> str | None:
    out = _run(["ip", "-n", host.netns, "-j", "neigh", "show", ip, "dev", interface])
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr")) if entries else None


def test_announcement_packets() -> None:
    mac = bytes.fromhex("020000000002")
    frame = gratuitous_arp_frame(mac, ipaddress.IPv4Address("10.77.0.100"))
    assert len(frame) == 60
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    arp = frame[14:42]
    assert arp[6:8] == b"\x00\x01"  # a request
    assert arp[8:14] == mac and arp[14:18] == arp[24:28] == bytes([10, 77, 0, 100])
    advert = neighbour_advertisement(mac, ipaddress.IPv6Address("2001:db8:77::100"))
    assert advert[0] == 136 and advert[4] & 0x20 and not advert[4] & 0x40  # override, unsolicited
    assert advert[24:32] == b"\x02\x01" + mac


# The stand-ins: composition, the null identity, the state file, the factory.


async def test_composite_takes_in_order_and_releases_in_reverse(tmp_path: Path) -> None:
    world: dict[str, str] = {"b": "mine"}
    events: list[str] = []
    parts = [FakeIdentity(world, n, tmp_path / f"{n}.json", events=events) for n in "abc"]
    composite = CompositeIdentity(parts)
    await composite.take()
    assert world == {"a": "public", "b": "public", "c": "public"}
    await composite.release()
    assert events == ["take a", "take b", "take c", "release c", "release b", "release a"]
    assert world == {"b": "mine"}
    assert composite.describe() == "fake a + fake b + fake c"


@pytest.mark.parametrize(
    "failure",
    [IdentityError("refused"), OSError("disk on fire")],
    ids=["identity-error", "other-error"],
)
async def test_composite_failed_take_releases_what_it_took(
    tmp_path: Path, failure: Exception
) -> None:
    world: dict[str, str] = {"a": "mine"}
    events: list[str] = []
    parts = [FakeIdentity(world, n, tmp_path / f"{n}.json", events=events) for n in "abc"]
    parts[1].fail = failure
    composite = CompositeIdentity(parts)
    with pytest.raises(IdentityError, match=r"refused|disk on fire"):
        await composite.take()
    assert events == ["take a", "take b", "release b", "release a"]
    assert world == {"a": "mine"}
    assert not await composite.holds()


async def test_composite_release_goes_on_after_a_failure(tmp_path: Path) -> None:
    world: dict[str, str] = {}
    events: list[str] = []
    parts = [FakeIdentity(world, n, tmp_path / f"{n}.json", events=events) for n in "ab"]
    await CompositeIdentity(parts).take()
    parts[1].fail_release = IdentityError("stuck")
    with pytest.raises(IdentityError, match=r"could not release fake b: .*stuck"):
        await CompositeIdentity(parts).release()
    assert events[-1] == "release a"
    assert "a" not in world


def test_state_file_round_trip_and_refusals(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "sub" / "state.json")
    assert state.load() is None
    state.save({"added": [1, 2]})
    assert state.load() == {"added": [1, 2], "version": 1}
    assert [p.name for p in state.path.parent.iterdir()] == ["state.json"]  # no temp left
    state.clear()
    state.clear()
    assert state.load() is None
    state.path.write_text("{half")
    with pytest.raises(IdentityError, match="not JSON"):
        state.load()
    state.path.write_text('{"version": 99}')
    with pytest.raises(IdentityError, match="version 1"):
        state.load()


def test_identity_error_is_a_stead_error() -> None:
    error = IdentityError("interface eth9 does not exist")
    assert str(error) == "Identity error: interface eth9 does not exist"
    assert error.exit_code == 70


def test_make_identity_picks_the_backends(tmp_path: Path) -> None:
    nothing = make_identity(ClusterConfig.model_validate(_cluster({})), tmp_path)
    assert isinstance(nothing, NullIdentity)
    config = ClusterConfig.model_validate(_cluster(_public("eth0", SERVICE_V4)))
    built = make_identity(config, tmp_path)
    assert isinstance(built, CompositeIdentity)
    assert [type(b) for b in built.backends] == [LinuxHost]
    assert built.describe() == f"host name {PUBLIC_HOSTNAME}, {SERVICE_V4} on eth0"
    # An identity taken under an older configuration is still released.
    StateFile(tmp_path / "identity-linux.json").save({"added": [], "taken": True})
    leftover = make_identity(ClusterConfig.model_validate(_cluster({})), tmp_path)
    assert isinstance(leftover, CompositeIdentity)
