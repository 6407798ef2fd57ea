"""The lab's DNS server (``stead.lab.dns``): its texts, its cluster settings, and its files
served by a real ``named`` on loopback, updated with the key ``tsig-keygen`` wrote."""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsserver import free_port
from stead.config.schema import ClusterConfig
from stead.errors import LabError
from stead.identity import CompositeIdentity, make_identity
from stead.identity.dns import DnsIdentity, DnsSection, register_management
from stead.lab import dns as labdns
from stead.lab import procs
from stead.lab.config import lab_settings

LAB_DIR = Path("/var/lib/stead-lab")

# What `stead init` writes, reduced to what the schema needs.
INIT_TOML = """\
[cluster]
name = "lab"
id = "0123456789abcdef"
active = "primary"

[[protected]]
path = "/srv/lab"

[[nodes]]
name = "primary"
addresses = ["198.18.0.11"]

[[nodes]]
name = "secondary"
addresses = ["198.18.0.12"]

[[nodes]]
name = "tertiary"
addresses = ["198.18.0.13"]
"""


def test_named_configuration_serves_one_zone_to_one_update_key(tmp_path: Path) -> None:
    text = labdns.named_conf_text(
        directory=tmp_path,
        address="198.19.0.3",
        port=53,
        zone="lab.test.",
        zone_file=tmp_path / "lab.test.db",
        update_key="stead-lab",
        keys=f'include "{tmp_path}/stead-lab.key";',
    )
    assert "listen-on port 53 { 198.19.0.3; };" in text
    assert "recursion no;" in text and "allow-transfer { none; };" in text
    assert f'include "{tmp_path}/stead-lab.key";' in text
    assert 'zone "lab.test" {' in text
    assert 'allow-update { key "stead-lab"; };' in text
    assert f'pid-file "{tmp_path}/named.pid";' in text
    with pytest.raises(LabError, match="quote or backslash"):
        labdns.named_conf_text(
            directory=Path('/tmp/a"b'),
            address="198.19.0.3",
            port=53,
            zone="lab.test.",
            zone_file=tmp_path / "z",
            update_key="k",
            keys="",
        )


def test_zone_and_key_texts() -> None:
    assert labdns.zone_text("lab.test", "198.19.0.3").splitlines()[1:] == [
        "@       IN SOA  ns.lab.test. hostmaster.lab.test. 1 3600 600 86400 60",
        "@       IN NS   ns.lab.test.",
        "ns      IN A    198.19.0.3",
    ]
    assert labdns.key_clause("stead-lab", "c2VjcmV0") == (
        'key "stead-lab" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0";\n};\n'
    )


def test_the_client_resolves_through_the_lab_server_only() -> None:
    assert labdns.resolv_conf_text().splitlines()[1:] == [
        "nameserver 198.19.0.3",
        "search lab.test",
        "options timeout:1 attempts:2",
    ]
    host = "passwd: files systemd\nhosts:  files resolve [!UNAVAIL=return] mdns4 dns myhostname\n"
    assert labdns.nsswitch_text(host) == "passwd: files systemd\nhosts: files dns\n"
    assert labdns.nsswitch_text("") == (
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    )
    files = labdns.client_resolver_files()
    assert files["resolv.conf"] == Path("/etc/netns/stead-client/resolv.conf")
    assert files["nsswitch.conf"] == Path("/etc/netns/stead-client/nsswitch.conf")


def test_cluster_settings_are_a_valid_dns_section() -> None:
    settings = labdns.cluster_settings(LAB_DIR)
    section = DnsSection.model_validate(settings)
    assert (section.server, section.port, section.zone) == ("198.19.0.3", 53, "lab.test.")
    assert (section.key_name, section.key_algorithm) == ("stead-lab.", "hmac-sha256")
    assert section.key_file == "/var/lib/stead-lab/dns/stead-lab.key"
    assert (section.ttl, section.timeout) == (labdns.TTL, labdns.UPDATE_TIMEOUT)


def test_lab_settings_publish_each_nodes_own_address_by_dns() -> None:
    dns = labdns.cluster_settings(LAB_DIR)
    text = lab_settings(INIT_TOML, protect="/srv/lab", dns=dns)
    again = lab_settings(text, protect="/srv/lab", dns=dns)  # `up` again: no change
    assert tomllib.loads(again) == tomllib.loads(text)
    cluster = ClusterConfig.model_validate(tomllib.loads(text))
    assert cluster.public.dns is not None and cluster.public.dns.server == "198.19.0.3"
    assert cluster.public.fqdn == "labsvc.lab.test"
    published = {node.name: node.public_addresses for node in cluster.nodes}
    assert published == {
        "primary": ["198.19.0.11"],
        "secondary": ["198.19.0.12"],
        "tertiary": ["198.19.0.13"],
    }
    for node in cluster.nodes:  # the address a node publishes is its management address
        assert node.management is not None
        assert node.management.address == f"{node.public_addresses[0]}/24"
    identity = make_identity(cluster, Path("/nonexistent"), "secondary")
    assert isinstance(identity, CompositeIdentity)
    backend = identity.backends[-1]
    assert isinstance(backend, DnsIdentity)
    assert backend.describe() == "DNS labsvc.lab.test. -> 198.19.0.12 (server 198.19.0.3:53)"
    assert "dns" not in tomllib.loads(lab_settings(INIT_TOML, protect="/srv/lab"))["public"]


# A real named with the lab's files, on loopback.


@pytest.fixture
def lab_named(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The lab's named.conf, zone and tsig-keygen key, served on 127.0.0.1."""
    binary = labdns.named_binary()
    if binary is None:
        pytest.fail("named is not installed: apt-get install bind9 (make sysdeps)")
    port = free_port()
    paths = labdns.prepare(tmp_path, address="127.0.0.1", port=port)
    labdns.check_config(paths.config)
    with open(paths.log, "wb") as log:
        process = subprocess.Popen(
            [binary, "-g", "-4", "-n", "1", "-c", str(paths.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def answering() -> bool:
            assert process.poll() is None, f"named exited:\n{paths.log.read_text()}"
            return labdns.answers_soa("127.0.0.1", port, labdns.ZONE, timeout=1.0)

        assert procs.wait_until(answering, 15, interval=0.05), paths.log.read_text()
        assert labdns.named_processes(str(tmp_path)) == [process.pid]
        assert labdns.named_processes(str(tmp_path / "other")) == []
        yield tmp_path, port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_the_lab_server_accepts_updates_signed_with_the_generated_key(
    lab_named: tuple[Path, int],
) -> None:
    lab_dir, port = lab_named
    paths = labdns.DnsPaths.of(lab_dir)
    assert paths.key.read_text().startswith('key "stead-lab" {')  # as tsig-keygen writes it
    assert paths.key.stat().st_mode & 0o777 == 0o600
    section = DnsSection.model_validate(
        labdns.cluster_settings(lab_dir) | {"server": "127.0.0.1", "port": port}
    )
    assert section.key_file == str(paths.key)
    name = "secondary.lab.test."
    assert labdns.lookup(name, address="127.0.0.1", port=port) == set()
    assert await register_management(section, name, "198.19.0.12/24")
    assert labdns.lookup(name, address="127.0.0.1", port=port) == {"198.19.0.12"}
    # The key stays, and so does the zone with what agents set in its journal.
    before = (paths.key.read_text(), paths.zone_file.read_text())
    labdns.prepare(lab_dir, address="127.0.0.1", port=port)
    assert (paths.key.read_text(), paths.zone_file.read_text()) == before
