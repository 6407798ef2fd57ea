"""The DNS identity backend against a real authoritative server: BIND's ``named``.

Each test that talks DNS gets its own ``named`` on 127.0.0.1 and a free port
(``tests/dnsserver.py``), serving the zone ``lab.test.`` and accepting updates signed with
one TSIG key only; it is stopped at the end of the test, whatever happened. The addresses
published are documentation addresses: they are only data in the zone, nothing reaches them.

The identity seam's conformance suite (``test_identity.py``) runs here too, on this backend.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_identity as conformance
from pydantic import ValidationError

from dnsserver import KEY_NAME, OTHER_KEY_NAME, ZONE, Named, named_binary, new_secret
from stead.identity import IdentityError, StateFile
from stead.identity.dns import DnsIdentity, DnsSection, read_tsig_key, register_management

NAME = "svc.lab.test."
OURS = ["198.51.100.10/24", "2001:db8::10"]  # as the configuration gives them, or bare
OURS_V4, OURS_V6 = {"198.51.100.10"}, {"2001:db8::10"}
THEIRS = ["203.0.113.20", "2001:db8::20"]


@pytest.fixture
def named(tmp_path: Path) -> Iterator[Named]:
    if named_binary() is None:
        pytest.fail("named is not installed: apt-get install bind9 (make sysdeps)")
    with Named(tmp_path / "named") as server:
        yield server


def _section(server: Named, key_file: Path, **changes: Any) -> DnsSection:
    fields: dict[str, Any] = {
        "server": server.address,
        "port": server.port,
        "zone": ZONE,
        "key_name": KEY_NAME,
        "key_file": str(key_file),
        "public_name": NAME,
        **changes,
    }
    return DnsSection.model_validate(fields)


@pytest.fixture
def section(named: Named, tmp_path: Path) -> DnsSection:
    return _section(named, named.key_file(tmp_path / "tsig.key"))


Make = Callable[..., DnsIdentity]


@pytest.fixture
def make(section: DnsSection, tmp_path: Path) -> Make:
    """``make(addresses=OURS, state="ours", section=...)``: a backend on its own state file."""

    def build(
        addresses: list[str] = OURS, state: str = "ours", dns: DnsSection | None = None
    ) -> DnsIdentity:
        return DnsIdentity(dns or section, addresses, tmp_path / f"identity-dns-{state}.json")

    return build


def _published(server: Named, name: str = NAME) -> tuple[set[str], set[str]]:
    return server.lookup(name, "A"), server.lookup(name, "AAAA")


# The conformance suite of the seam, on this backend.


@pytest.fixture
def agent(make: Make) -> conformance.Agent:
    return conformance.InProcessAgent(make)


test_nothing_held_at_first_and_release_is_a_no_op = (
    conformance.test_nothing_held_at_first_and_release_is_a_no_op
)
test_take_is_idempotent_and_release_gives_back = (
    conformance.test_take_is_idempotent_and_release_gives_back
)
test_a_restarted_agent_releases_what_a_killed_one_took = (
    conformance.test_a_restarted_agent_releases_what_a_killed_one_took
)


# Take, release, holds: what the server answers.


async def test_take_replaces_the_records_and_release_removes_them(
    named: Named, make: Make, tmp_path: Path
) -> None:
    old_active = make(THEIRS, state="theirs")
    await old_active.take()
    assert _published(named) == ({"203.0.113.20"}, {"2001:db8::20"})
    ours = make()
    await ours.take()
    assert _published(named) == (OURS_V4, OURS_V6)
    assert await ours.holds()
    assert not await old_active.holds()
    await ours.take()  # idempotent
    assert _published(named) == (OURS_V4, OURS_V6)
    await ours.release()
    assert _published(named) == (set(), set())
    assert not (tmp_path / "identity-dns-ours.json").exists()
    await ours.release()


async def test_take_of_ipv4_only_removes_an_older_aaaa(named: Named, make: Make) -> None:
    await make(THEIRS, state="theirs").take()
    ours = make(["198.51.100.10"])
    await ours.take()
    assert _published(named) == (OURS_V4, set())
    await ours.release()
    assert _published(named) == (set(), set())


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [
        pytest.param(OURS, THEIRS, id="other-addresses"),
        pytest.param(["198.51.100.10"], ["198.51.100.10", "2001:db8::20"], id="same-a-plus-aaaa"),
        pytest.param(OURS, ["198.51.100.10", "2001:db8::20"], id="same-a-other-aaaa"),
    ],
)
async def test_a_late_release_leaves_the_records_of_the_node_that_took_over(
    named: Named, make: Make, tmp_path: Path, mine: list[str], theirs: list[str]
) -> None:
    deposed, new_active = make(mine), make(theirs, state="theirs")
    await deposed.take()
    await new_active.take()  # over the deposed active, which did not release (cut off)
    before = _published(named)
    assert not await deposed.holds()
    await deposed.release()
    assert _published(named) == before  # the prerequisites failed: nothing was deleted
    assert await new_active.holds()
    assert not (tmp_path / "identity-dns-ours.json").exists()  # nothing of ours is left


async def test_a_record_changed_behind_our_back_is_not_held_and_take_repairs_it(
    named: Named, make: Make
) -> None:
    ours = make()
    await ours.take()
    await make(THEIRS, state="theirs").take()
    assert not await ours.holds()
    await ours.take()
    assert await ours.holds()
    assert _published(named) == (OURS_V4, OURS_V6)


async def test_a_crash_before_the_update_releases_nothing_of_the_others(
    named: Named, make: Make, tmp_path: Path
) -> None:
    """The state a take writes before it sends the update is enough to undo it, safely."""
    await make(THEIRS, state="theirs").take()
    StateFile(tmp_path / "identity-dns-ours.json").save(
        {"zone": ZONE, "name": NAME, "addresses": ["198.51.100.10", "2001:db8::10"]}
        | {"taken": False}
    )
    restarted = make()
    assert not await restarted.holds()
    await restarted.release()
    assert _published(named) == ({"203.0.113.20"}, {"2001:db8::20"})
    assert not (tmp_path / "identity-dns-ours.json").exists()


async def test_a_killed_agent_is_released_by_the_next_one(named: Named, make: Make) -> None:
    await make().take()  # the instance is lost without a release
    restarted = make()
    assert await restarted.holds()
    await restarted.release()
    assert _published(named) == (set(), set())


async def test_a_cancelled_take_then_release_leaves_nothing(named: Named, make: Make) -> None:
    ours = make()
    for _ in range(3):
        task = asyncio.create_task(ours.take())
        await asyncio.sleep(0)  # the take's worker thread is started, and outlives the cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ours.release()
        assert _published(named) == (set(), set())
        assert not await ours.holds()


async def test_a_new_public_name_drops_the_records_of_the_old(
    named: Named, make: Make, section: DnsSection
) -> None:
    await make().take()
    renamed = make(dns=section.model_copy(update={"public_name": "www.lab.test."}))
    await renamed.take()
    assert _published(named) == (set(), set())
    assert _published(named, "www.lab.test.") == (OURS_V4, OURS_V6)
    await renamed.release()
    assert _published(named, "www.lab.test.") == (set(), set())


def test_describe(section: DnsSection, make: Make) -> None:
    assert make().describe() == (
        f"DNS {NAME} -> 198.51.100.10, 2001:db8::10 (server {section.where})"
    )
    assert section.where == f"127.0.0.1:{section.port}"


# Refusals and failures: a clear IdentityError, never the secret, nothing left behind.


@pytest.mark.parametrize(
    ("key_name", "use_other_secret", "expected"),
    [
        pytest.param(KEY_NAME, False, r"rcode NOTAUTH, TSIG BADSIG", id="wrong-secret"),
        pytest.param("unknown-key.", False, r"rcode NOTAUTH, TSIG BADKEY", id="unknown-key"),
        pytest.param(OTHER_KEY_NAME, True, r"rcode REFUSED\)", id="key-not-allowed"),
    ],
)
async def test_a_refused_update_is_a_clear_error_without_the_secret(
    named: Named,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    key_name: str,
    use_other_secret: bool,
    expected: str,
) -> None:
    secret = named.other_secret if use_other_secret else new_secret()
    key_file = named.key_file(tmp_path / "wrong.key", secret)
    dns = _section(named, key_file, key_name=key_name)
    backend = DnsIdentity(dns, OURS, tmp_path / "identity-dns.json")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(IdentityError, match=expected) as caught:
        await backend.take()
    message = str(caught.value)
    assert dns.where in message and NAME in message
    for text in (secret, named.secret):
        assert text not in message and text not in caplog.text
    assert not (tmp_path / "identity-dns.json").exists()  # the server changed nothing
    assert not await backend.holds()
    assert _published(named) == (set(), set())


async def test_a_refused_take_over_a_held_identity_keeps_what_to_release(
    named: Named, make: Make, section: DnsSection
) -> None:
    await make().take()
    key_file = Path(section.key_file)
    named.key_file(key_file, new_secret())  # a bad key rotation
    moved = make(["198.51.100.11"])  # and a new address in the configuration
    with pytest.raises(IdentityError, match=r"BADSIG.*undoing the take failed too"):
        await moved.take()
    named.key_file(key_file)  # the right key again
    await moved.release()  # releases what the server still holds: the first take's records
    assert _published(named) == (set(), set())


async def test_a_stopped_server_is_a_clear_error(named: Named, make: Make, tmp_path: Path) -> None:
    ours = make()
    named.stop()
    with pytest.raises(IdentityError, match=rf"{named.address}:{named.port}.*{NAME}") as caught:
        await ours.take()
    assert "refused the connection" in str(caught.value)
    assert not (tmp_path / "identity-dns-ours.json").exists()
    assert not await ours.holds()


async def test_a_release_the_server_cannot_take_never_holds_up_a_demotion(
    named: Named, make: Make, tmp_path: Path, section: DnsSection, silent_server: int
) -> None:
    """DNS advertises, it does not fence: the release returns, and a later one cleans up."""
    await make().take()
    mute = section.model_copy(update={"port": silent_server, "timeout": 0.3})
    await make(dns=mute).release()  # no error: the node demotes at once
    assert (tmp_path / "identity-dns-ours.json").exists()  # what is still published
    assert _published(named)[0] == {"198.51.100.10"}
    await make().release()  # the server answers again
    assert _published(named) == (set(), set())
    assert not (tmp_path / "identity-dns-ours.json").exists()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections (in the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_a_server_that_does_not_answer_times_out_and_keeps_the_state(
    named: Named, silent_server: int, tmp_path: Path, section: DnsSection
) -> None:
    """The update may have been applied: the state stays, and a later release undoes it."""
    state = tmp_path / "identity-dns.json"
    mute = section.model_copy(update={"port": silent_server, "timeout": 0.3})
    with pytest.raises(IdentityError, match=r"did not answer within 0.3 s") as caught:
        await DnsIdentity(mute, OURS, state).take()
    assert f"127.0.0.1:{silent_server}" in str(caught.value) and NAME in str(caught.value)
    assert "undoing the take failed too" in str(caught.value)
    assert state.exists()
    later = DnsIdentity(section, OURS, state)  # the server answers again
    assert not await later.holds()
    await later.release()
    assert not state.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, r"cannot read the TSIG key file .*missing\.key", id="missing"),
        pytest.param("not base64 at all!", r"holds no base64 secret", id="garbage"),
        pytest.param("", r"holds no base64 secret", id="empty"),
        pytest.param(
            'key "someone-else" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0";\n};\n',
            r"holds key someone-else, not stead-test\.",
            id="other-key-clause",
        ),
        pytest.param(
            'key "stead-test" {\n\talgorithm hmac-sha512;\n\tsecret "c2VjcmV0";\n};\n',
            r"is for hmac-sha512, not hmac-sha256",
            id="other-algorithm",
        ),
    ],
)
def test_bad_key_files_are_refused_by_name(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / ("missing.key" if content is None else "bad.key")
    if content is not None:
        path.write_text(content)
    dns = DnsSection(server="127.0.0.1", zone=ZONE, key_name=KEY_NAME, key_file=str(path))
    with pytest.raises(IdentityError, match=expected) as caught:
        read_tsig_key(dns)
    assert "c2VjcmV0" not in str(caught.value)


async def test_a_bind_key_clause_works_as_a_key_file(named: Named, tmp_path: Path) -> None:
    """The file ``tsig-keygen -a hmac-sha256 stead-test`` writes."""
    key_file = tmp_path / "tsig-keygen.key"
    key_file.write_text(
        f'key "stead-test" {{\n\talgorithm hmac-sha256;\n\tsecret "{named.secret}";\n}};\n'
    )
    backend = DnsIdentity(_section(named, key_file), OURS, tmp_path / "identity-dns.json")
    await backend.take()
    assert await backend.holds()
    await backend.release()


# The management name of each node.


async def test_register_management_points_the_name_at_the_address(
    named: Named, section: DnsSection
) -> None:
    name = "node-one.lab.test."
    assert await register_management(section, name, "198.18.0.11/24")
    assert named.lookup(name) == {"198.18.0.11"}
    assert not await register_management(section, name, "198.18.0.11")  # already so
    assert await register_management(section, name, "198.18.0.12")
    assert named.lookup(name) == {"198.18.0.12"}
    assert await register_management(section, "node-one.lab.test", "2001:db8::11")
    assert named.lookup(name, "AAAA") == {"2001:db8::11"}
    assert named.lookup(name) == {"198.18.0.12"}  # the other family is left as it was


async def test_register_management_refusals(named: Named, section: DnsSection) -> None:
    with pytest.raises(IdentityError, match=r"node-one\.example\.com\. is not in zone lab\.test"):
        await register_management(section, "node-one.example.com", "198.18.0.11")
    with pytest.raises(IdentityError, match="is not an IP address"):
        await register_management(section, "node-one.lab.test", "node-one")
    refused = section.model_copy(update={"key_name": OTHER_KEY_NAME})
    with pytest.raises(IdentityError, match=r"node-one\.lab\.test\..*BADSIG"):
        await register_management(refused, "node-one.lab.test", "198.18.0.11")


# The configuration section.


def test_section_defaults_and_normal_forms() -> None:
    dns = DnsSection(
        server=" 2001:DB8::53 ",
        zone="Lab.Test",
        key_name="stead-test",
        key_algorithm="HMAC-SHA512",
        key_file="/etc/stead/tsig.key",
    )
    assert (dns.port, dns.ttl, dns.timeout, dns.key_algorithm) == (53, 30, 2.0, "hmac-sha512")
    assert (dns.server, dns.zone, dns.key_name) == ("2001:db8::53", "Lab.Test.", "stead-test.")
    assert dns.where == "[2001:db8::53]:53"
    assert dns.public_name == ""
    assert dns.with_default_name("svc.lab.test").public_name == NAME
    named = dns.model_copy(update={"public_name": "other.lab.test."})
    assert named.with_default_name("svc.lab.test") is named
    with pytest.raises(ValueError, match=r"public\.fqdn is empty"):
        dns.with_default_name("")
    with pytest.raises(ValidationError, match="not in zone"):
        dns.with_default_name("svc.example.com")
    with pytest.raises(IdentityError, match="no public DNS name"):
        DnsIdentity(dns, OURS, Path("/nonexistent/state.json"))


BASE = {"server": "192.0.2.53", "zone": "lab.test", "key_name": "k", "key_file": "/k.key"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"server": "ns1.example.com"}, r"not an IP address: give the address of the zone's"),
        ({"zone": ""}, r"zone '' is not a DNS name"),
        ({"zone": "lab test"}, r"zone 'lab test' is not a DNS name"),
        ({"key_name": "."}, r"key_name '\.' is not a DNS name"),
        ({"key_file": "tsig.key"}, r"key_file 'tsig.key' must be an absolute path"),
        ({"key_algorithm": "hmac-sha3"}, r"key_algorithm"),
        ({"public_name": "svc.example.com"}, r"public_name svc\.example\.com\. is not in zone"),
        ({"public_name": "svc_1.lab.test"}, r"'svc_1' is not a host name label"),
        ({"port": 0}, r"port"),
        ({"ttl": -1}, r"ttl"),
        ({"timeout": 0}, r"timeout"),
        ({"secret": "c2VjcmV0"}, r"Extra inputs are not permitted"),
    ],
)
def test_section_refusals(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        DnsSection.model_validate(BASE | changes)


def test_the_backend_refuses_bad_addresses(tmp_path: Path) -> None:
    dns = DnsSection.model_validate(BASE | {"public_name": "svc.lab.test"})
    with pytest.raises(IdentityError, match="no address to publish"):
        DnsIdentity(dns, [], tmp_path / "state.json")
    with pytest.raises(IdentityError, match="'svc' is not an IP address"):
        DnsIdentity(dns, ["svc"], tmp_path / "state.json")


# ---- configuration wiring ------------------------------------------------------------------


def _cluster_with_dns(**public: object) -> dict[str, object]:
    return {
        "cluster": {"name": "t", "id": "0123456789", "active": "a"},
        "protected": [{"path": "/srv"}],
        "public": {
            "fqdn": "svc.lab.test",
            "dns": {
                "server": "127.0.0.1",
                "zone": "lab.test",
                "key_name": "stead",
                "key_file": "/etc/stead/dns.key",
            },
            **public,
        },
        "nodes": [
            {"name": "a", "addresses": ["198.18.0.1"], "public_addresses": ["192.0.2.1"]},
            {"name": "b", "addresses": ["198.18.0.2"], "public_addresses": ["192.0.2.2"]},
        ],
    }


def test_make_identity_publishes_this_nodes_addresses(tmp_path: Path) -> None:
    from stead.config.schema import ClusterConfig
    from stead.identity import CompositeIdentity, make_identity

    config = ClusterConfig.model_validate(_cluster_with_dns())
    identity = make_identity(config, tmp_path, "b")
    assert isinstance(identity, CompositeIdentity)
    (backend,) = identity.backends
    assert isinstance(backend, DnsIdentity)
    assert "svc.lab.test" in backend.describe() and "192.0.2.2" in backend.describe()


def test_dns_configuration_mistakes_are_refused_at_load() -> None:
    from stead.config.schema import ClusterConfig

    same = _cluster_with_dns()
    same["nodes"][1]["public_addresses"] = ["192.0.2.1"]  # type: ignore[index]
    with pytest.raises(ValueError, match="must differ between nodes"):
        ClusterConfig.model_validate(same)
    with pytest.raises(ValueError, match=r"public_name or public\.fqdn"):
        ClusterConfig.model_validate(_cluster_with_dns(fqdn=""))
