"""``stead patch`` in the lab: a marker package installed on every node, one node at a time.

Each lab node has its own ``/opt/lab`` and its own dpkg database, so the marker package
(files only under ``/opt/lab/marker/``) is installed on the node that ran ``dpkg -i`` only.
The CLI runs on the host as an operator would, and reaches each node by SSH from the
client namespace under its management name (the lab's ``patch.connect``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import clusterutil
import pytest
from clusterutil import wait_connected, wait_until
from failoverutil import Client, active_of, wait_active, whoami

from stead.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.cluster]

PACKAGE = "marker"


def build_marker(where: Path) -> Path:
    return clusterutil.build_marker_deb(where, PACKAGE, "installed", "patched by stead patch\n")


def installed(lab: Lab) -> dict[str, bool]:
    found = {}
    for node in lab.nodes:
        query = ["dpkg-query", "-W", "-f", "${Status}", PACKAGE]
        result = lab.exec(node, query, capture=True, timeout=30)
        found[node] = result.returncode == 0 and "ok installed" in result.stdout
    return found


def stead_patch(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEAD_LAB_DIR=str(lab.dir))
    env.pop("STEAD_CONFIG_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "stead", "patch", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )


def test_rolling_patch_installs_everywhere_and_a_failure_stops_where_it_happened(
    lab: Any, tmp_path: Path
) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    wait_active(built, "primary")
    deb = build_marker(tmp_path)
    install = f"dpkg -i {deb}"

    # A dry run prints the plan with each node's exact argv and changes nothing.
    dry = stead_patch(built, "--command", install, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == f"rolling patch: primary is active; command: {install}"
    patches = [line.split()[1] for line in lines if " patch " in line]
    assert patches == ["tertiary", "secondary", "primary"], dry.stdout
    assert f"tertiary.lab.test '{install}'" in dry.stdout
    assert "secondary    switchover" in dry.stdout
    assert installed(built) == dict.fromkeys(built.nodes, False)

    # The command fails on the first passive: nothing after it runs, primary keeps serving.
    failing = (
        'if [ "$(hostname)" = tertiary ]; then echo "no space left on tertiary" >&2; exit 3; fi; '
        + install
    )
    client = Client(built)
    try:
        failed = stead_patch(built, "--command", failing)
    finally:
        samples = client.stop()
    assert failed.returncode == 90, failed.stdout + failed.stderr
    assert "Patch stopped at tertiary: patch: the command exited with 3" in failed.stderr
    assert "stopped at tertiary: patch: the command exited with 3" in failed.stdout
    assert "| no space left on tertiary" in failed.stdout  # the command's output tail
    assert "not done: tertiary resync, secondary pre-check, secondary patch" in failed.stdout
    assert "the cluster still serves with primary" in failed.stdout
    assert installed(built) == dict.fromkeys(built.nodes, False)
    assert active_of(built) == "primary" and whoami(built) == "primary"
    assert {node for node in samples.answered_by() if node} == {"primary"}
    assert samples.longest_outage() < 2.0, samples.rows[-5:]

    # Ctrl-C during a node's command: the command finishes, and the run stops before the
    # next step (the command runs in a session of its own, out of the terminal's reach).
    slow = "echo started > /opt/lab/ctrl-c; sleep 2; echo finished > /opt/lab/ctrl-c"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stead",
            "patch",
            "--command",
            slow,
            "--nodes",
            "tertiary,secondary",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, STEAD_LAB_DIR=str(built.dir)),
    )

    def marked(text: str) -> bool:
        found = built.exec("tertiary", ["cat", "/opt/lab/ctrl-c"], capture=True, timeout=10)
        return found.stdout == text

    wait_until(lambda: marked("started\n"), 60, "the command to start on tertiary")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 90, out + err
    assert "stopped at tertiary: resync: interrupted by the operator (Ctrl-C)" in out
    assert "tertiary     patch        ok" in out
    assert marked("finished\n"), "Ctrl-C must not kill the command"
    assert built.exec("secondary", ["test", "-e", "/opt/lab/ctrl-c"]).returncode == 1

    # The real run: every node patched, the former active last, after the switchover.
    done = stead_patch(built, "--command", install, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["stopped"] is None
    assert [(s["node"], s["step"], s["result"]) for s in report["steps"]] == [
        (node, step, "ok")
        for node, step in [
            ("tertiary", "pre-check"),
            ("tertiary", "patch"),
            ("tertiary", "resync"),
            ("secondary", "pre-check"),
            ("secondary", "patch"),
            ("secondary", "resync"),
            ("secondary", "switchover"),
            ("primary", "pre-check"),
            ("primary", "patch"),
            ("primary", "resync"),
        ]
    ]
    assert all(s["started"] and s["seconds"] >= 0 for s in report["steps"])
    assert report["serving"] == "secondary"
    assert installed(built) == dict.fromkeys(built.nodes, True)
    wait_active(built, "secondary")
    assert active_of(built) == "secondary"
