"""``stead drift`` in a lab: each node's own system trees and dpkg database, compared.

The lab's nodes share nothing outside the protected set: ``/opt/lab`` and ``/etc/lab`` come
from a system image of each node's own (alike at first, but for the preserved
``/etc/lab/node.conf``) and ``/var/lib/dpkg`` is a copy of the host's per node. Changes made
on one node there stay on that node, and drift must name exactly them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import clusterutil
import pytest
from clusterutil import peers, sh, wait_connected, wait_until

from stead.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.cluster]

MARKER = "stead-drift-marker"


def drift(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """``stead drift`` from the host: the CLI finds the lab's active agent."""
    env = {k: v for k, v in os.environ.items() if k != "STEAD_CONFIG_DIR"}
    env["STEAD_LAB_DIR"] = str(lab.dir)
    return subprocess.run(
        [sys.executable, "-m", "stead", "drift", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def drift_json(lab: Lab, *args: str, code: int) -> dict[str, Any]:
    result = drift(lab, "--json", *args)
    assert result.returncode == code, result.stderr + result.stdout
    return dict(json.loads(result.stdout))


def build_marker_deb(where: Path) -> Path:
    return clusterutil.build_marker_deb(where, MARKER, "README", "installed on one node only\n")


def no_differences(report: dict[str, Any]) -> None:
    assert report["state"] == "in step", report
    assert report["differences"] == 0
    assert report["warnings"] == []


def test_drift_names_exactly_what_differs(lab: Any, tmp_path: Path) -> None:
    built: Lab = lab(3)
    wait_connected(built)

    # At first every passive is in step: node.conf differs but is each node's own.
    first = drift_json(built, code=0)
    assert first["active"] == "primary"
    assert first["manager"] == "dpkg"
    assert sorted(first["nodes"]) == ["secondary", "tertiary"]
    for report in first["nodes"].values():
        no_differences(report)
        assert report["paths"]["compared"] >= 6  # both trees, app/, bin/, tool, VERSION...
        assert report["packages"] == {"only_active": {}, "only_passive": {}, "version_differs": {}}

    # Drift on purpose, outside the protected set, on one node each.
    sh(built, "tertiary", "echo 2.0 > /opt/lab/app/VERSION")
    sh(built, "secondary", "echo 'extra = 1' > /etc/lab/extra.conf")
    sh(built, "secondary", "echo 'node = changed' > /etc/lab/node.conf")  # preserved
    deb = build_marker_deb(tmp_path)
    installed = built.exec(
        "tertiary", ["dpkg", "--log=/dev/null", "-i", str(deb)], capture=True, timeout=120
    )
    assert installed.returncode == 0, installed.stderr
    assert (
        MARKER
        not in subprocess.run(
            ["dpkg-query", "-W", MARKER], capture_output=True, text=True, check=False
        ).stdout
    )  # the host's database is untouched

    result = drift_json(built, code=1)
    secondary, tertiary = result["nodes"]["secondary"], result["nodes"]["tertiary"]
    assert secondary["state"] == tertiary["state"] == "drifted"
    assert secondary["differences"] == 1
    assert secondary["paths"]["only_passive"] == ["/etc/lab/extra.conf"]
    assert tertiary["paths"]["content"] == ["/opt/lab/app/VERSION"]
    assert tertiary["paths"]["only_passive"] == ["/opt/lab/marker", "/opt/lab/marker/README"]
    assert tertiary["packages"]["only_passive"] == {MARKER: "1.0"}
    assert tertiary["differences"] == 4
    for report in (secondary, tertiary):
        assert report["paths"]["metadata"] == report["paths"]["type"] == []
        assert report["paths"]["only_active"] == []
        assert report["packages"]["only_active"] == report["packages"]["version_differs"] == {}
    assert "node.conf" not in json.dumps(result["nodes"])

    # The human form: a summary per passive, then the differences.
    text = drift(built)
    assert text.returncode == 1, text.stderr
    assert "secondary: drifted: 1 path only here" in text.stdout
    assert (
        "tertiary: drifted: 1 package only here, 2 paths only here, 1 path with other content"
    ) in text.stdout
    for expected in ("/opt/lab/app/VERSION", "/etc/lab/extra.conf", f"{MARKER} 1.0"):
        assert expected in text.stdout

    # One passive, one part: secondary's packages are in step.
    only = drift_json(built, "--node", "secondary", "--packages-only", code=0)
    assert list(only["nodes"]) == ["secondary"]
    assert only["nodes"]["secondary"]["paths"] is None
    bad = drift(built, "--node", "ghost")
    assert bad.returncode == 11 and "ghost" in bad.stderr, bad.stderr
    both = drift(built, "--packages-only", "--trees-only")
    assert both.returncode == 11 and "exclude each other" in both.stderr

    # A passive whose agent is down is reported, and the others are still compared.
    built.stop("tertiary")
    wait_until(lambda: peers(built)["tertiary"]["state"] == "disconnected", 30, "tertiary down")
    partial = drift_json(built, "--trees-only", code=1)
    assert partial["nodes"]["tertiary"]["state"] in ("unreachable", "failed")
    assert partial["nodes"]["secondary"]["paths"]["only_passive"] == ["/etc/lab/extra.conf"]
    alone = drift(built, "--node", "tertiary")
    assert alone.returncode == 3, alone.stderr + alone.stdout
    assert "tertiary: unreachable" in alone.stdout or "tertiary: failed" in alone.stdout
