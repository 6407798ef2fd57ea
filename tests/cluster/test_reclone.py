"""Reclone in the lab: passives rebuilt from the active's system trees, their own kept.

Each lab node has system trees of its own (``/opt/lab``, ``/etc/lab``; ``/etc/lab/node.conf``
is preserved). The active is "patched" (files added, changed and removed in its trees, data
changed in the protected path), then passives are recloned from the host's CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clusterutil import assert_converged, sh, wait_connected, wait_sync, wait_until
from failoverutil import agent, wait_active, whoami

from stead.lab import Lab
from treeutil import snapshot

pytestmark = [pytest.mark.root, pytest.mark.cluster]

TREES = ("/opt/lab", "/etc/lab")
IGNORE = (".stead-reclone", "lost+found")


def system_tree(lab: Lab, node: str) -> dict[str, Any]:
    root = Path(str(lab.node_fs_path(node)).removesuffix("/srv/lab"))
    out: dict[str, Any] = {}
    for tree in TREES:
        for rel, record in snapshot(root / tree.lstrip("/"), ignore=IGNORE).items():
            out[f"{tree}/{rel}"] = record
    return out


def without_preserved(tree: dict[str, Any]) -> dict[str, Any]:
    own = ("/etc/lab/node.conf", "/etc/lab/node.d")
    return {k: v for k, v in tree.items() if k not in own and not k.startswith(own[1] + "/")}


def reclone(lab: Lab, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEAD_LAB_DIR=str(lab.dir))
    return subprocess.run(
        [sys.executable, "-m", "stead", "reclone", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


PATCH_ACTIVE = """
set -e
echo 2.0 > /opt/lab/app/VERSION
printf '#!/bin/sh\\necho lab tool 2.0\\n' > /opt/lab/app/bin/tool
mkdir -p /opt/lab/app/lib/plugins
head -c 300000 /dev/urandom > /opt/lab/app/lib/plugins/big.so
ln -sf ../VERSION /opt/lab/app/lib/version-link
chmod 600 /etc/lab/app.conf
echo 'feature = on' > /etc/lab/feature.conf
echo changed > /srv/lab/data
"""


def test_reclone_one_then_all_keeps_each_nodes_own_and_rolls_back(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    wait_active(built, "primary")
    sh(built, "tertiary", "echo 'local tweak' > /opt/lab/app/tertiary-only")
    # Preserved, in a directory the active lacks: it stays, and so does what holds it.
    sh(built, "tertiary", "mkdir /etc/lab/node.d && echo mine > /etc/lab/node.d/mgmt.conf")
    sh(built, "primary", PATCH_ACTIVE)
    wait_sync(built)
    original_tertiary = system_tree(built, "tertiary")

    plan = reclone(built, "tertiary", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "would change" in plan.stdout
    assert system_tree(built, "tertiary") == original_tertiary  # a dry run changes nothing
    # As if neither node had ever hashed its trees: no hint of what the tertiary holds goes
    # to the active, which hashes none of its files for the manifest; the tertiary must ask.
    for node in ("primary", "tertiary"):
        (built.paths(node).state / "hash-cache.msgpack").unlink(missing_ok=True)

    done = reclone(built, "tertiary")
    assert done.returncode == 0, done.stderr
    active = without_preserved(system_tree(built, "primary"))
    recloned = system_tree(built, "tertiary")
    assert without_preserved(recloned) == active
    assert recloned["/etc/lab/node.conf"] == original_tertiary["/etc/lab/node.conf"]
    mgmt = "/etc/lab/node.d/mgmt.conf"
    assert recloned[mgmt] == original_tertiary[mgmt]
    assert "/opt/lab/app/tertiary-only" not in recloned
    # The secondary was not touched; the protected set is still replicated everywhere.
    assert system_tree(built, "secondary")["/opt/lab/app/VERSION"] != active["/opt/lab/app/VERSION"]
    wait_sync(built)
    assert_converged(built)

    history = reclone(built, "history", "--json")
    runs = __import__("json").loads(history.stdout)
    assert [(r["node"], r["result"]) for r in runs] == [("tertiary", "ok")]
    # Only the four files the patch changed were copied (some twice, if they had not
    # settled): the tertiary's identical files were compared by digest (no hash cache on
    # either node: no hint went to the active, and the tertiary asked for the digests).
    assert runs[0]["summary"]["fetch_files"] == 4
    assert runs[0]["files"] >= 4 and runs[0]["bytes"] >= 300000

    back = reclone(built, "rollback", "tertiary")
    assert back.returncode == 0, back.stderr
    assert system_tree(built, "tertiary") == original_tertiary

    every = reclone(built, "--all")
    assert every.returncode == 0, every.stderr
    for node in ("secondary", "tertiary"):
        assert without_preserved(system_tree(built, node)) == active
        node_conf = sh(built, node, "cat /etc/lab/node.conf")
        assert node_conf == f"node = {node}\n"
    # Recloned nodes serve as passives, and one takes over when the active dies.
    wait_sync(built)
    built.kill("primary")
    built.partition("primary")
    wait_until(lambda: whoami(built) in ("secondary", "tertiary"), 30, "a failover")
    successor = whoami(built)
    assert successor is not None
    assert sh(built, successor, "cat /opt/lab/app/VERSION /etc/lab/node.conf") == (
        f"2.0\nnode = {successor}\n"
    )
    assert sh(built, successor, "cat /srv/lab/data") == "changed\n"


def test_refused_without_another_in_sync_passive_and_for_unknown_nodes(lab: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    alone = reclone(built, "secondary")
    assert alone.returncode == 100
    assert "only passive" in alone.stderr
    unknown = reclone(built, "nobody")
    assert unknown.returncode != 0 and "nobody" in unknown.stderr
    both = reclone(built, "secondary", "--all")
    assert both.returncode != 0 and "not both" in both.stderr
    forced = reclone(built, "secondary", "--force")
    assert forced.returncode == 0, forced.stderr


def _start_big_reclone(built: Lab, node: str) -> int:
    sh(built, "primary", "mkdir -p /opt/lab/bulk && for i in $(seq 1 150); do "
       "head -c 1000000 /dev/urandom > /opt/lab/bulk/f$i; done")  # fmt: skip
    job = agent(built, "primary").call("POST", "/v1/reclone", {"nodes": [node]})
    job_id = int(job["id"])

    def copying() -> bool:
        info = agent(built, "primary").call("GET", f"/v1/jobs/{job_id}")
        moved = (info.get("progress") or {}).get("progress") or {}
        return info["state"] != "running" or moved.get("bytes_done", 0) > 0

    wait_until(copying, 60, "the copy to start")
    return job_id


def _job(built: Lab, job_id: int) -> dict[str, Any]:
    result: dict[str, Any] = agent(built, "primary").call("GET", f"/v1/jobs/{job_id}")
    return result


def test_kill_of_the_passive_mid_copy_leaves_it_as_it_was(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    before = system_tree(built, "tertiary")
    job_id = _start_big_reclone(built, "tertiary")
    built.kill("tertiary")
    built.start("tertiary")
    wait_until(lambda: _job(built, job_id)["state"] != "running", 120, "the job to end")
    job = _job(built, job_id)
    if job["state"] == "done":  # it finished before the kill
        assert "/opt/lab/bulk/f150" in system_tree(built, "tertiary")
    else:
        assert "restarted" in job["error"] or "answering" in job["error"], job["error"]
        assert system_tree(built, "tertiary") == before
        root = Path(str(built.node_fs_path("tertiary")).removesuffix("/srv/lab"))
        assert not list((root / "opt/lab/.stead-reclone").glob("stage-*"))
    # And a new run goes through.
    again = reclone(built, "tertiary")
    assert again.returncode == 0, again.stderr
    assert without_preserved(system_tree(built, "tertiary")) == without_preserved(
        system_tree(built, "primary")
    )


def test_a_short_link_cut_mid_copy_still_finishes(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    job_id = _start_big_reclone(built, "tertiary")
    built.partition("tertiary")
    built.heal("tertiary")
    wait_until(lambda: _job(built, job_id)["state"] != "running", 150, "the job to end")
    job = _job(built, job_id)
    assert job["state"] == "done", job["error"]
    assert without_preserved(system_tree(built, "tertiary")) == without_preserved(
        system_tree(built, "primary")
    )


def test_kill_of_the_active_mid_copy_leaves_the_passive_as_it_was(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    before = system_tree(built, "tertiary")
    _start_big_reclone(built, "tertiary")
    built.kill("primary")
    built.start("primary")  # it may or may not be the active again: either will do
    wait_until(
        lambda: (
            system_tree(built, "tertiary") == before
            or "/opt/lab/bulk/f150" in system_tree(built, "tertiary")
        ),
        60,
        "the passive to discard its staging",
    )
    history = agent(built, "primary").call("GET", "/v1/reclone/history")
    assert history[-1]["result"] in ("interrupted", "ok")


def stead_cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEAD_LAB_DIR=str(lab.dir))
    return subprocess.run(
        [sys.executable, "-m", "stead", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_schedule_fires_a_reclone_and_follows_to_the_passives(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    sh(built, "primary", "echo 5.0 > /opt/lab/app/VERSION")
    added = stead_cli(
        built, "schedule", "add", "each-minute", "--cron", "* * * * *", "--tz", "UTC",
        "--node", "tertiary",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    bad = stead_cli(built, "schedule", "add", "bad", "--cron", "61 * * * *", "--all")
    assert bad.returncode != 0 and "cron" in bad.stderr.lower()

    def listed(node: str) -> list[str]:
        answer = agent(built, node).call("GET", "/v1/schedules")
        return [s["name"] for s in answer["schedules"]]

    # Every passive holds the schedules too: a successor after a failover runs them on.
    wait_until(lambda: listed("tertiary") == ["each-minute"], 30, "the schedule to be shared")

    def fired() -> bool:
        runs = agent(built, "primary").call("GET", "/v1/reclone/history")
        return any(r["trigger"] == "schedule each-minute" and r["result"] == "ok" for r in runs)

    wait_until(fired, 90, "the scheduled reclone")  # the next minute boundary, then the run
    assert sh(built, "tertiary", "cat /opt/lab/app/VERSION") == "5.0\n"
    assert sh(built, "secondary", "cat /opt/lab/app/VERSION") == "1.0\n"
    removed = stead_cli(built, "schedule", "remove", "each-minute")
    assert removed.returncode == 0, removed.stderr
    wait_until(lambda: listed("tertiary") == [], 30, "the removal to be shared")


LIBVIRT_WORLD = """<node>
{domains}
  <pool type='dir'><name>lab-pool</name><target><path>/lab-pool</path></target>
{volumes}
  </pool>
  <network><name>default</name><bridge name='virbr0'/>
    <ip address='192.168.122.1' netmask='255.255.255.0'/></network>
</node>
"""
DOMAIN = """  <domain type='test'><name>vm-{node}</name><memory unit='MiB'>1024</memory>
    <vcpu>1</vcpu><os><type arch='i686'>hvm</type></os><devices>
    <disk type='volume' device='disk'><source pool='lab-pool' volume='vm-{node}.qcow2'/>
    <target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:00:00:{index:02x}'/>
    <source network='default'/></interface></devices></domain>"""
VOLUME = """    <volume type='file'><name>vm-{node}.qcow2</name><capacity unit='MiB'>20</capacity>
    <target><format type='qcow2'/></target></volume>"""


def test_the_libvirt_provider_from_the_cli(lab: Any, tmp_path: Path) -> None:
    """With [reclone] provider = "libvirt", the active clones its machine into the node's
    (libvirt's test driver, a real libvirt with machines in memory), then checks the node's
    protected set; rollback restores the node's machine."""
    from clusterutil import set_cluster_option

    built: Lab = lab(3)
    nodes = ("primary", "secondary", "tertiary")
    world = tmp_path / "libvirt.xml"
    world.write_text(
        LIBVIRT_WORLD.format(
            domains="\n".join(DOMAIN.format(node=n, index=i + 1) for i, n in enumerate(nodes)),
            volumes="\n".join(VOLUME.format(node=n) for n in nodes),
        )
    )
    domains = ", ".join(f'{n} = "vm-{n}"' for n in nodes)
    section = (
        f'[reclone]\nprovider = "libvirt"\n\n[reclone.libvirt]\nuri = "test://{world}"\n'
        f"domains = {{ {domains} }}\n\n[patch]"
    )
    set_cluster_option(built, "[patch]", section)
    wait_connected(built)
    wait_sync(built)
    plan = reclone(built, "tertiary", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "clone lab-pool/vm-primary.qcow2" in " ".join(plan.stdout.split())
    done = reclone(built, "tertiary")
    assert done.returncode == 0, done.stderr
    assert "original kept as vm-tertiary-orig-" in " ".join(done.stdout.split())
    history = __import__("json").loads(reclone(built, "history", "--json").stdout)
    assert [(r["node"], r["result"]) for r in history] == [("tertiary", "ok")]
    back = reclone(built, "rollback", "tertiary")
    assert back.returncode == 0, back.stderr
    assert "rolled back" in back.stdout


def test_automatic_reclone_on_drift_and_on_a_package_change(lab: Any, tmp_path: Path) -> None:
    from clusterutil import build_marker_deb, set_cluster_option

    built: Lab = lab(3)
    auto = (
        "[reclone.auto]\nenabled = true\ninterval = 1.0\non_drift = true\n"
        "on_packages = true\ncooldown = 0\n\n[patch]"
    )
    set_cluster_option(built, "[patch]", auto)
    wait_connected(built)
    wait_sync(built)

    def runs(trigger: str) -> list[dict[str, Any]]:
        history = agent(built, "primary").call("GET", "/v1/reclone/history")
        return [r for r in history if trigger in r["trigger"] and r["result"] == "ok"]

    # Drift: a file appears on the tertiary only; the active rebuilds it by itself.
    sh(built, "tertiary", "echo local > /opt/lab/app/stray")
    wait_until(lambda: runs("drifted"), 60, "an automatic reclone after drift")
    assert [r["node"] for r in runs("drifted")] == ["tertiary"]
    assert "/opt/lab/app/stray" not in system_tree(built, "tertiary")

    # A package installed on the active (a patch): every passive is rebuilt.
    deb = build_marker_deb(tmp_path, "stead-auto-marker", "README", "patched\n")
    sh(built, "primary", f"dpkg -i {deb} >/dev/null")
    wait_until(lambda: len(runs("packages")) == 2, 90, "automatic reclones after a patch")
    assert sorted(r["node"] for r in runs("packages")) == ["secondary", "tertiary"]
    for node in ("secondary", "tertiary"):
        assert sh(built, node, "cat /opt/lab/marker/README") == "patched\n"
