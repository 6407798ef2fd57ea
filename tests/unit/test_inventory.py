"""``stead inventory``: the three formats, from a configuration with management identities."""

from __future__ import annotations

from typing import Any

import pytest

from stead.cli.inventory import ansible, build, hosts
from stead.config.schema import ClusterConfig


def cluster() -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "cluster": {"name": "prod", "id": "0123456789", "active": "alpha"},
            "protected": [{"path": "/srv"}],
            "public": {
                "hostname": "shop",
                "fqdn": "shop.example.com",
                "short_name": "SHOP",
                "addresses": [{"address": "192.0.2.10/24", "interface": "eth0"}],
            },
            "nodes": [
                {
                    "name": name,
                    "addresses": [f"198.18.0.{i + 1}"],
                    "management": {
                        "hostname": f"{name}-m",
                        "fqdn": f"{name}-m.example.com",
                        "address": f"192.0.2.{i + 21}/24",
                        "interface": "eth0",
                    },
                }
                for i, name in enumerate(["alpha", "beta"])
            ],
        }
    )


STATUS: dict[str, Any] = {
    "epoch": 4,
    "nodes": [
        {"name": "alpha", "role": "active", "state": "active"},
        {"name": "beta", "role": "passive", "state": "in sync"},
    ],
    "roles": {"public_holder": "alpha"},
}


def test_json_names_roles_and_management_identities() -> None:
    data = build(cluster(), STATUS)
    assert data["public"]["holder"] == "alpha"
    beta = data["nodes"][1]
    assert (beta["role"], beta["state"], beta["management_address"]) == (
        "passive",
        "in sync",
        "192.0.2.22",
    )
    assert beta["short_name"] == "BETA-M"


def test_without_an_agent_roles_are_unknown() -> None:
    data = build(cluster(), None)
    assert {n["role"] for n in data["nodes"]} == {"unknown"}


def test_ansible_groups_active_and_passive() -> None:
    text = ansible(build(cluster(), STATUS))
    assert "[stead_active]\nalpha-m.example.com ansible_host=192.0.2.21" in text
    assert "[stead_passive]\nbeta-m.example.com ansible_host=192.0.2.22" in text
    assert "stead_state=in_sync" in text
    assert text.rstrip().endswith("[stead:children]\nstead_active\nstead_passive")


def test_hosts_lists_management_and_public_names() -> None:
    text = hosts(build(cluster(), STATUS))
    assert "192.0.2.22\tbeta-m.example.com beta-m\n" in text
    assert "192.0.2.10\tshop.example.com shop\n" in text


@pytest.mark.parametrize(
    ("management", "reason"),
    [
        ({"hostname": "a", "short_name": "X" * 16}, "1 to 15"),
        ({"hostname": "a", "short_name": "A:B"}, "may not contain"),
        ({"hostname": "a", "fqdn": "b.example.com"}, "must be a.<domain>"),
        ({"hostname": "a", "address": "10.0.0.1/24"}, "go together"),
        ({"hostname": "a.b"}, "not a host name"),
    ],
)
def test_bad_management_identities_are_refused(management: dict[str, str], reason: str) -> None:
    config = cluster().model_dump()
    config["nodes"][0]["management"] = management
    with pytest.raises(ValueError, match=reason):
        ClusterConfig.model_validate(config)
