"""The questions of ``stead configure``, in order: cluster, nodes, active node, protected
paths, public identity, services, failover.

A new cluster is asked for everything, with ``stead init``'s defaults; a change walks
through the existing configuration, each value offered as the default and each node,
path, address and service kept, edited or removed. Existing nodes keep their names (their
certificates carry them): to rename one, remove it and add a new one.
"""

from __future__ import annotations

import copy
import shlex
import typing
from collections.abc import Iterable
from typing import Any

from stead.config.wizard_ask import (
    KEEP_EDIT_REMOVE,
    Questions,
    as_argv,
    as_float,
    as_int,
    as_list,
    local_interfaces,
    shown,
    systemd_units,
)
from stead.config.wizard_rules import REMOVE, Loc, current_value, get_at, set_at, unique_name
from stead.services.config import HealthCheck, ServiceAction

SUGGESTED_NODE_NAMES = ("primary", "secondary", "tertiary")
CHECK_KINDS: tuple[str, ...] = typing.get_args(HealthCheck.model_fields["kind"].annotation)
ACTIONS: tuple[str, ...] = typing.get_args(ServiceAction)
_CHECK_TARGETS = ("unit", "host", "port", "url", "expect_status", "argv")
_CONTROLS = ("unit", "exec", "commands")
_CHECK_PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "systemd": {},
    "tcp": {"port": 1},
    "http": {"url": "http://127.0.0.1/"},
    "command": {"argv": ["true"]},
}


class Wizard(Questions):
    """Ask every question of a new cluster, or of a change to an existing one."""

    def run(self) -> dict[str, Any]:
        """Ask everything; returns the new draft (the one given is left as it was)."""
        original = copy.deepcopy(self.draft)
        self.field(("cluster", "name"), "Cluster name")
        self.nodes()
        names = [node["name"] for node in self.draft["nodes"]]
        active = self.draft["cluster"].get("active")
        self.field(
            ("cluster", "active"),
            "Node that is active when the cluster first starts",
            prefill=False,
            current=active if active in names else names[0],
            completions=names,
        )
        self.protected()
        self.public()
        self.services()
        self.failover()
        _prune(self.draft, original)
        return self.draft

    def nodes(self) -> None:
        self.asker.say("Nodes: each node's channel addresses and its own identity.")
        nodes: list[dict[str, Any]] = self.draft.setdefault("nodes", [])
        if not self.new:
            for index in self._review_nodes():
                self.node(index, new=False)
        while len(nodes) < 2 or self.yes(
            "Add another node?" if self.new else "Add a node?", default=False
        ):
            if self.cannot_add_nodes:
                self.asker.say(self.cannot_add_nodes)
                break
            self.add_node()

    def _review_nodes(self) -> Iterable[int]:
        nodes: list[dict[str, Any]] = self.draft["nodes"]
        index = 0
        while index < len(nodes):
            node = nodes[index]
            action = self.choose(f"Node {_node_summary(node)}", KEEP_EDIT_REMOVE, "keep")
            if action == "remove" and len(nodes) <= 2:
                self.asker.say(
                    "A cluster keeps at least two nodes: add the new node first, and remove "
                    "this one in another run."
                )
                continue
            if action == "remove":
                nodes.pop(index)
                continue
            if action == "edit":
                yield index
            index += 1

    def add_node(self) -> None:
        nodes: list[dict[str, Any]] = self.draft["nodes"]
        names = [node["name"] for node in nodes]
        index = len(nodes)
        priorities = [node.get("priority", 100) for node in nodes]
        nodes.append(
            {
                "name": unique_name("new-node-", names),
                "addresses": ["192.0.2.1"],  # stand-in until asked, never written
                "priority": max(priorities) + 10 if priorities else 100,
                "automatic_failover": True,
            }
        )
        default = (
            SUGGESTED_NODE_NAMES[index] if index < len(SUGGESTED_NODE_NAMES) else f"node{index + 1}"
        )
        if default in names:
            default = unique_name("node", names)
        self.node(index, new=True, name=default)

    def node(self, index: int, *, new: bool, name: str = "") -> None:
        loc: Loc = ("nodes", index)
        if new:
            self.field((*loc, "name"), "Node name", current=name)
        name = self.draft["nodes"][index]["name"]
        self.field(
            (*loc, "addresses"),
            f"Channel addresses of {name} (IPs, comma-separated)",
            parse=as_list,
            text="" if new else None,
        )
        self.field((*loc, "priority"), f"Priority of {name} (lower is preferred)", parse=as_int)
        self.flag((*loc, "automatic_failover"), f"May {name} take over without an operator?")
        self.management(index, new=new)

    def management(self, index: int, *, new: bool) -> None:
        node = self.draft["nodes"][index]
        name = node["name"]
        loc: Loc = ("nodes", index, "management")
        old = dict(node.get("management") or {})
        host = self.field(
            (*loc, "hostname"),
            f"Management host name of {name}, held while passive (empty: none)",
            current=old.get("hostname", name if new else ""),
            remove_if_empty=loc,
        )
        if not host:
            return
        self.field(
            (*loc, "fqdn"),
            f"FQDN of {host} (empty: none)",
            current=_fqdn_default(self.draft, old, host),
            remove_if_empty=(*loc, "fqdn"),
            also=[loc],
        )
        self.field(
            (*loc, "short_name"),
            f"NetBIOS short name of {name}, at most 15 characters",
            hint=f"empty: {host[:15].upper()}",
            remove_if_empty=(*loc, "short_name"),
        )
        address = self.field(
            (*loc, "address"),
            f"Management address of {name} with prefix, e.g. 192.0.2.10/24 (empty: none)",
            remove_if_empty=(*loc, "address"),
        )
        if not address:
            set_at(self.draft, (*loc, "interface"), REMOVE)
            return
        self.field(
            (*loc, "interface"),
            f"Interface of {address} on {name}",
            remove_if_empty=(*loc, "interface"),
            also=[loc],
            completions=self._interfaces(),
        )

    def protected(self) -> None:
        self.asker.say("Protected paths: what is kept identical on every node.")
        entries: list[dict[str, Any]] = self.draft.setdefault("protected", [])
        if not self.new:
            for index in self.review(("protected",), "Protected path", _path_summary):
                self.protected_path(index, new=False)
        while not entries or self.yes("Add another protected path?", default=False):
            index = len(entries)
            entries.append({"path": f"/nonexistent/stead-wizard-{index}", "include": ["**"]})
            self.protected_path(index, new=True)

    def protected_path(self, index: int, *, new: bool) -> None:
        loc: Loc = ("protected", index)
        path = self.field(
            (*loc, "path"), "Protected path", text="" if new else None, complete_paths=True
        )
        self.field(
            (*loc, "include"), f"Include globs under {path} (comma-separated)", parse=as_list
        )
        self.field((*loc, "exclude"), f"Exclude globs under {path} (e.g. *.tmp)", parse=as_list)

    def public(self) -> None:
        self.asker.say("Public identity: what clients use; the active node holds it.")
        self.field(("public", "hostname"), "Public host name (empty: host names left alone)")
        self.field(("public", "fqdn"), "Public FQDN (empty: none)")
        self.field(("public", "short_name"), "Public NetBIOS short name (empty: none)")
        for index in self.review(("public", "addresses"), "Public address", _address_summary):
            self.public_address(index, new=False)
        while True:
            addresses = get_at(self.draft, ("public", "addresses"), [])
            index = len(addresses)
            loc: Loc = ("public", "addresses", index)
            placeholder = {"address": "192.0.2.1/32", "interface": "stand-in"}
            set_at(self.draft, loc, placeholder)
            address = self.field(
                (*loc, "address"),
                "Public address to add, with prefix, e.g. 198.51.100.10/24 (empty: done)",
                text="",
                remove_if_empty=loc,
            )
            if not address:
                break
            self.public_address(index, new=True)
        self.field(
            ("public", "service_port"), "TCP port of the service (0: ICMP echo)", parse=as_int
        )

    def public_address(self, index: int, *, new: bool) -> None:
        loc: Loc = ("public", "addresses", index)
        if not new:
            self.field((*loc, "address"), "Public address with prefix")
        address = self.draft["public"]["addresses"][index]["address"]
        self.field(
            (*loc, "interface"),
            f"Interface that carries {address}",
            text="" if new else None,
            completions=self._interfaces(),
        )

    def services(self) -> None:
        self.asker.say("Services: started in this order on the active, kept stopped elsewhere.")
        entries: list[dict[str, Any]] = self.draft.setdefault("services", [])
        if not self.new:
            for index in self.review(("services",), "Service", _service_summary):
                self.service(index, new=False)
        while self.yes("Add another service?" if entries else "Add a service?", default=False):
            index = len(entries)
            names = [entry.get("name", "") for entry in entries]
            entries.append({"name": unique_name("service", names), "unit": "stand-in.service"})
            self.service(index, new=True)

    def service(self, index: int, *, new: bool) -> None:
        loc: Loc = ("services", index)
        entry = self.draft["services"][index]
        name = self.field((*loc, "name"), "Service name", text="" if new else None)
        control = "exec" if entry.get("exec") else "commands" if entry.get("start") else "unit"
        chosen = self.choose(f"How is {name} controlled", _CONTROLS, control)
        if chosen != control:
            for key in ("unit", "exec", "start", "stop", "status"):
                entry.pop(key, None)
            if chosen == "exec":
                entry["exec"] = ["true"]
            elif chosen == "commands":
                entry.update({"start": ["true"], "stop": ["true"], "status": ["true"]})
            else:
                entry["unit"] = "stand-in.service"
        blank = new or chosen != control
        if chosen == "unit":
            self.field(
                (*loc, "unit"),
                f"systemd unit of {name}",
                text="" if blank else None,
                also=[loc],
                completions=systemd_units(),
            )
        elif chosen == "exec":
            self.field(
                (*loc, "exec"),
                f"Command line stead runs and supervises for {name}",
                parse=as_argv,
                text="" if blank else None,
                also=[loc],
            )
        else:
            for key in ("start", "stop", "status"):
                self.field(
                    (*loc, key),
                    f"Command line that runs '{key}' for {name}",
                    parse=as_argv,
                    text="" if blank else None,
                    also=[loc],
                )
        self.health_check(index)

    def health_check(self, index: int) -> None:
        loc: Loc = ("services", index, "checks", 0)
        entry = self.draft["services"][index]
        checks: list[dict[str, Any]] = entry.get("checks", [])
        old = checks[0] if checks else None
        kind = self.choose(
            f"Health check of {entry['name']}",
            ("none", *CHECK_KINDS),
            old.get("kind", "none") if old else "none",
        )
        if kind == "none":
            if checks:
                checks.pop(0)
            if not checks:
                entry.pop("checks", None)
            return
        blank = old is None or old.get("kind") != kind
        if blank:
            # A new kind: its target starts as a stand-in, asked next; the timing is kept.
            kept = {k: v for k, v in (old or {}).items() if k not in (*_CHECK_TARGETS, "kind")}
            check = {"kind": kind, **_CHECK_PLACEHOLDERS[kind], **kept}
            if old is None:
                entry.setdefault("checks", []).insert(0, check)
            else:
                checks[0] = check
        service: Loc = ("services", index)
        text = "" if blank else None
        if kind == "systemd":
            self.field(
                (*loc, "unit"),
                "Unit to ask",
                hint="empty: the service's unit",
                remove_if_empty=(*loc, "unit"),
                also=[service, loc],
                completions=systemd_units(),
            )
        elif kind == "tcp":
            self.field((*loc, "host"), "Address to connect to")
            self.field((*loc, "port"), "Port to connect to", parse=as_int, text=text, also=[loc])
        elif kind == "http":
            url = "http://127.0.0.1/" if blank else None
            self.field((*loc, "url"), "URL to GET", text=url, also=[loc])
            self.field((*loc, "expect_status"), "Expected HTTP status", parse=as_int)
        else:
            self.field(
                (*loc, "argv"),
                "Check command line (exit 0: healthy)",
                parse=as_argv,
                text=text,
                also=[loc],
            )
        self.field((*loc, "interval"), "Seconds between checks", parse=as_float)
        self.field((*loc, "timeout"), "Seconds one check may take", parse=as_float, also=[loc])
        self.field((*loc, "failures"), "Failures in a row before acting", parse=as_int)
        self.field(
            (*loc, "actions"),
            f"Actions, one per run of failures ({', '.join(ACTIONS)})",
            parse=as_list,
            completions=ACTIONS,
        )

    def failover(self) -> None:
        self.asker.say("Failover: when a passive takes over by itself.")
        self.field(
            ("failover", "witnesses"),
            "Witnesses: IP or IP:PORT that prove a node is on the network (the gateway)",
            parse=as_list,
        )
        summary = ", ".join(
            f"{key} {shown(current_value(self.draft, ('failover', key)))}"
            for key in ("timeout", "automatic", "require_sync", "public_check", "self_fence")
        )
        if not self.yes(f"Change the failover options ({summary})?", default=False):
            return
        self.field(("failover", "timeout"), "Seconds of silence before a takeover", parse=as_float)
        self.flag(("failover", "automatic"), "Automatic failover at all?")
        self.flag(("failover", "require_sync"), "Only a passive in sync takes over by itself?")
        self.flag(("failover", "public_check"), "No failover while the public address answers?")
        self.flag(("failover", "self_fence"), "Active cut off from everything turns passive?")
        self.flag(
            ("failover", "network_switchover"), "Switch over when the active loses witnesses?"
        )

    def _interfaces(self) -> list[str]:
        used = {
            str(get_at(node, ("management", "interface"), "") or "")
            for node in self.draft.get("nodes", [])
        }
        used |= {
            str(entry.get("interface", ""))
            for entry in get_at(self.draft, ("public", "addresses"), [])
        }
        return sorted((used - {"", "stand-in"}) | set(local_interfaces()))


def _node_summary(node: dict[str, Any]) -> str:
    text = f"{node.get('name')} ({', '.join(node.get('addresses', []))}"
    text += f", priority {node.get('priority', 100)}"
    management = node.get("management") or {}
    if management:
        text += f", management {management.get('hostname')}"
    return text + ")"


def _path_summary(entry: dict[str, Any]) -> str:
    include = ", ".join(entry.get("include", ["**"]))
    exclude = ", ".join(entry.get("exclude", [])) or "nothing"
    return f"{entry.get('path')} (include {include}; exclude {exclude})"


def _address_summary(entry: dict[str, Any]) -> str:
    return f"{entry.get('address')} on {entry.get('interface')}"


def _service_summary(entry: dict[str, Any]) -> str:
    how = entry.get("unit") or shlex.join(entry.get("exec") or entry.get("start") or [])
    return f"{entry.get('name')} ({how})"


def _fqdn_default(draft: dict[str, Any], old: dict[str, Any], host: str) -> str:
    """The old FQDN under the new host name, else the domain other names use."""
    fqdn = str(old.get("fqdn", ""))
    if fqdn and "." in fqdn:
        return f"{host}.{fqdn.split('.', 1)[1]}"
    known = [str(get_at(n, ("management", "fqdn"), "") or "") for n in draft.get("nodes", [])]
    known.append(str(get_at(draft, ("public", "fqdn"), "") or ""))
    domains = [name.split(".", 1)[1] for name in known if "." in name]
    return f"{host}.{domains[0]}" if domains else ""


def _prune(draft: dict[str, Any], original: dict[str, Any]) -> None:
    """Drop empty tables and lists the wizard made where there were none."""
    for key in list(draft):
        value = draft[key]
        if isinstance(value, dict):
            before = original.get(key)
            _prune(value, before if isinstance(before, dict) else {})
        if value in ([], {}) and key not in original:
            del draft[key]
