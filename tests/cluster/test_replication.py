"""Replication between real agents in lab namespaces: every change arrives, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from clusterutil import (
    agent_log,
    assert_converged,
    assert_event,
    check_json,
    peers,
    py,
    set_cluster_option,
    sh,
    status,
    stead,
    wait_connected,
    wait_sync,
    wait_until,
)

from stead.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.cluster]

CHANGES = r"""
set -e
cd /srv/lab
mkdir -p app/conf app/data 'odd name' deep/a/b/c
echo 'listen 8080' > app/conf/server.conf
for i in $(seq 1 50); do echo "record $i" > app/data/r$i.txt; done
head -c 3000000 /dev/urandom > app/data/blob.bin
ln -s conf/server.conf app/current.conf
ln app/data/r3.txt app/data/r3.hardlink
truncate -s 5000000 app/data/sparse.img
printf data | dd of=app/data/sparse.img bs=1 seek=4000000 conv=notrunc status=none
echo x > 'odd name/file with spaces'
python3 -c "open(b'/srv/lab/app/\xff\xfename', 'wb').write(b'not utf-8 name')"
echo 'listen 9090' > app/conf/server.conf
mv app/data/r1.txt app/data/renamed.txt
rm app/data/r2.txt
rm -r deep/a/b
chmod 600 app/conf/server.conf
chown 1234:5678 app/data/r4.txt
touch -d '2001-02-03 04:05:06' app/data/r5.txt
truncate -s 10 app/data/r6.txt
echo more >> app/data/r7.txt
mv app mv-app
"""


def test_changes_reach_every_passive(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    sh(built, "primary", CHANGES)
    wait_sync(built)
    reference = assert_converged(built)
    assert reference["mv-app/conf/server.conf"][1] == 0o600
    assert reference["mv-app/current.conf"] == ("symlink", "conf/server.conf")
    assert "deep/a/b" not in reference and "deep/a" in reference
    secondary = built.node_fs_path("secondary")
    hardlinked = (secondary / "mv-app/data/r3.txt").stat()
    assert hardlinked.st_nlink == 2
    assert (secondary / "mv-app/data/r4.txt").stat().st_uid == 1234
    sparse = (secondary / "mv-app/data/sparse.img").stat()
    assert sparse.st_size == 5_000_000
    assert sparse.st_blocks * 512 < 1_000_000  # holes stayed holes
    for node in peers(built).values():
        assert node["state"] == "in sync"
        assert node["lag_seconds"] == 0
    # On the host, outside every node, the CLI talks to the lab's active node.
    host = subprocess.run(
        [sys.executable, "-m", "stead", "status", "--json"],
        env={**os.environ, "STEAD_LAB_DIR": str(built.dir), "STEAD_CONFIG_DIR": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(host.stdout)["role"] == "active"
    # A check afterwards finds nothing to repair.
    report = check_json(built)
    assert report["state"] == "done"
    assert all(not r["differences"] for r in report["result"].values())


def test_big_file_then_one_byte_sends_one_block(lab: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    sh(built, "primary", "head -c 67108864 /dev/urandom > /srv/lab/big.bin")
    before = wait_sync(built)["secondary"]["bytes_sent"]
    sh(
        built,
        "primary",
        "printf Z | dd of=/srv/lab/big.bin bs=1 seek=33554433 conv=notrunc status=none",
    )
    after = wait_sync(built)["secondary"]["bytes_sent"]
    assert after - before < 4 * 65536, f"a 1-byte change sent {after - before} bytes"
    assert_converged(built)


def test_data_every_passive_took_is_never_written_to_the_active_journal(lab: Any) -> None:
    """Write-behind: 128 MiB of new files reach both passives while the active's journal
    segments stay small, because records both passives persisted are dropped unwritten."""
    built: Lab = lab(3)
    wait_connected(built)
    journal_dir = built.dir / "primary" / "state" / "journal"
    assert journal_dir.is_dir(), journal_dir
    sh(
        built,
        "primary",
        "mkdir -p /srv/lab/wb && for i in $(seq 1 128); do"
        " head -c 1048576 /dev/urandom > /srv/lab/wb/f$i; done",
    )
    wait_sync(built)
    journal = status(built, "primary")["journal"]
    on_disk = sum(p.stat().st_size for p in journal_dir.iterdir() if p.is_file())
    assert journal["skipped"] >= 64, journal  # most of the 128 file records
    assert on_disk < 64 * 1024**2, f"{on_disk} bytes of journal on disk: {journal}"
    assert_converged(built)


def test_many_small_files_and_directory_renames(lab: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    py(
        built,
        "primary",
        "import os\n"
        "for d in range(100):\n"
        "    os.makedirs(f'/srv/lab/many/d{d}')\n"
        "    for f in range(1000):\n"
        "        with open(f'/srv/lab/many/d{d}/f{f}', 'wb') as h: h.write(os.urandom(64))\n",
    )
    sh(built, "primary", "mv /srv/lab/many /srv/lab/renamed && mv /srv/lab/renamed/d7 /srv/lab/d7")
    wait_sync(built, timeout=300)
    reference = assert_converged(built)
    assert sum(1 for path in reference if path.startswith("renamed/")) == 99 * 1001
    assert "d7/f999" in reference


# Restarting the active takes a few seconds on a busy 2-core machine: past the lab's 2 s
# failover timeout the passive rightly takes over, which these tests are not about.
RESTART_SLACK = 60.0


def test_changes_made_while_the_active_agent_was_down_are_found(lab: Any) -> None:
    built: Lab = lab(2, failover_timeout=RESTART_SLACK)
    wait_connected(built)
    sh(
        built,
        "primary",
        "mkdir /srv/lab/d && echo one > /srv/lab/d/a && echo two > /srv/lab/b"
        " && echo linked > /srv/lab/l1 && ln /srv/lab/l1 /srv/lab/l2",
    )
    wait_sync(built)
    built.stop("primary")
    sh(built, "primary", "echo changed > /srv/lab/d/a && rm /srv/lab/b && echo new > /srv/lab/c")
    built.start("primary")
    wait_connected(built)
    # The restart's check repairs what changed while nobody watched.
    wait_until(lambda: peers(built)["secondary"]["state"] == "in sync", 60, "the restart check")
    wait_sync(built)
    assert_converged(built)
    # The restarted agent no longer knows which names of l1 it sent: the change travels as
    # a copy flagged linked, which the passive writes into its linked inode.
    sh(built, "primary", "echo more >> /srv/lab/l2")
    wait_sync(built)
    secondary = built.node_fs_path("secondary")
    assert (secondary / "l1").read_text() == "linked\nmore\n"
    assert os.path.samestat((secondary / "l1").stat(), (secondary / "l2").stat())


@pytest.mark.parametrize(
    ("victim", "memory"), [("primary", "64MiB"), ("secondary", "64MiB"), ("secondary", "0")]
)
def test_kill_9_mid_stream_loses_nothing(lab: Any, victim: str, memory: str) -> None:
    built: Lab = lab(2, failover_timeout=RESTART_SLACK)
    if memory != "64MiB":
        set_cluster_option(built, 'receive_memory = "64MiB"', f'receive_memory = "{memory}"')
    wait_connected(built)
    writer = built.popen(
        "primary",
        [
            "python3",
            "-c",
            "import os\n"
            "for i in range(3000):\n"
            "    with open(f'/srv/lab/f{i % 700}', 'ab') as h: h.write(os.urandom(2000))\n"
            "    if i % 100 == 0: os.makedirs(f'/srv/lab/dir{i}', exist_ok=True)\n",
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: peers(built)["secondary"]["applied"] > 50, 60, "replication to start")
    built.kill(victim)
    built.start(victim)
    assert writer.wait(timeout=120) == 0
    wait_connected(built)
    wait_until(
        lambda: peers(built)["secondary"]["state"] in ("in sync", "syncing"), 60, "check done"
    )
    wait_sync(built)
    assert_converged(built)
    assert "Traceback" not in agent_log(built, "secondary"), agent_log(built, "secondary")


def test_link_cut_and_restored(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    built.partition("secondary")
    sh(built, "primary", "for i in $(seq 1 200); do echo $i > /srv/lab/p$i; done; rm /srv/lab/p7")
    wait_until(
        lambda: peers(built)["secondary"]["state"] == "disconnected", 30, "the cut to be seen"
    )
    assert peers(built)["tertiary"]["state"] != "disconnected"
    built.heal()
    wait_connected(built)
    wait_sync(built)
    assert_converged(built)


def test_passive_restarted_during_initial_sync(lab: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    built.stop("secondary")
    sh(
        built,
        "primary",
        "for i in $(seq 1 40); do head -c 4000000 /dev/urandom > /srv/lab/blob$i; done",
    )
    built.start("secondary")
    wait_until(lambda: peers(built)["secondary"]["applied"] > 5, 60, "sync to be under way")
    built.kill("secondary")
    built.start("secondary")
    wait_connected(built)
    wait_sync(built, timeout=180)
    assert_converged(built)


def test_disk_full_passive_stalls_then_recovers(lab: Any) -> None:
    built: Lab = lab(2, disk_size="256M")
    # Everything through the receive queue: the applier stalls, the queue holds the rest.
    set_cluster_option(built, 'receive_memory = "64MiB"', 'receive_memory = "0"')
    # The restart's fast check must be over first: while it runs the passive reads as
    # "out of sync", and with the disk full it could not finish.
    wait_connected(built)
    wait_sync(built)
    built.fill_disk("secondary")
    sh(built, "primary", "head -c 20000000 /dev/urandom > /srv/lab/wontfit")
    wait_until(lambda: status(built, "secondary")["nodes"][0]["apply_error"], 60, "an apply error")
    assert peers(built)["secondary"]["state"] == "syncing"
    built.free_disk("secondary")
    wait_sync(built, timeout=120)
    assert_converged(built)


def test_check_repairs_a_drifted_passive(lab: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    sh(
        built,
        "primary",
        "cd /srv/lab && head -c 1000000 /dev/urandom > data && echo a > a && "
        "echo linked > l1 && ln l1 l2 && echo same > s1 && echo same > s2 && "
        "touch -d 2020-01-01 s1 s2",
    )
    wait_sync(built)
    # Same size and mtime: only block checksums can see this change. l1/l2 split apart and
    # s1/s2 joined into one inode: same content, only the link ids differ.
    sh(
        built,
        "secondary",
        "cd /srv/lab && cp -p data /tmp/ref && "
        "printf Q | dd of=data bs=1 seek=500000 conv=notrunc status=none && "
        "touch -r /tmp/ref data && echo junk > extra && chmod 700 a && "
        "cp -p l2 l2.new && mv l2.new l2 && ln -f s1 s2",
    )
    fast = check_json(built, "--fast")
    whats = {d["path"]: d["what"] for d in fast["result"]["secondary"]["differences"]}
    links = dict.fromkeys(["l1", "l2", "s1", "s2"], "links")
    assert whats == {"extra": "extra", "a": "meta", **links}
    secondary = built.node_fs_path("secondary")
    wait_sync(built)
    assert os.path.samestat((secondary / "l1").stat(), (secondary / "l2").stat())
    assert (secondary / "s1").stat().st_nlink == 1
    full = check_json(built)
    whats = {d["path"]: d["what"] for d in full["result"]["secondary"]["differences"]}
    assert whats == {"data": "content"}
    wait_sync(built)
    assert_converged(built)
    again = check_json(built)
    assert again["result"]["secondary"]["differences"] == []
    result = stead(built, "primary", "check", "--node", "nobody")
    assert result.returncode != 0
    assert "nobody" in result.stderr


def test_foreign_certificate_is_refused(lab: Any, tmp_path: Any) -> None:
    built: Lab = lab(2)
    wait_connected(built)
    other = tmp_path / "other"
    subprocess.run(
        [sys.executable, "-m", "stead", "init", "--out", str(other), "--node",
         "secondary=198.18.0.12", "--node", "primary=198.18.0.11", "--protect", "/srv/lab"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    probe = (
        "import asyncio, sys\n"
        "from stead.channel import transport\n"
        "d = sys.argv[1]\n"
        "ctx = transport.client_context(d + '/ca.pem', d + '/node.pem', d + '/node.key')\n"
        "async def main():\n"
        "    conn = await transport.connect('198.18.0.11', 7400, ctx, 'primary', 5)\n"
        "    try:\n"
        "        await conn.recv(timeout=5)\n"
        "    except Exception as exc:\n"
        "        print('refused', type(exc).__name__, exc)\n"
        "        return\n"
        "    print('accepted')\n"
        "try:\n"
        "    asyncio.run(main())\n"
        "except Exception as exc:\n"
        "    print('refused', type(exc).__name__, exc)\n"
    )
    result = built.exec(
        "secondary",
        ["python3", "-c", probe, str(other / "nodes" / "secondary")],
        capture=True,
        timeout=30,
    )
    assert result.stdout.startswith("refused"), result.stdout + result.stderr
    # The active still serves its own cluster.
    sh(built, "primary", "echo after > /srv/lab/after")
    wait_sync(built)
    assert_converged(built)


def test_passive_beyond_the_journal_bound_is_reset_and_checked(lab: Any) -> None:
    built: Lab = lab(2)
    set_cluster_option(built, 'journal_max = "10GiB"', 'journal_max = "64MiB"')
    wait_connected(built)
    sh(built, "primary", "echo before > /srv/lab/before")
    wait_sync(built)
    built.stop("secondary")
    sh(
        built,
        "primary",
        "for i in $(seq 1 30); do head -c 4000000 /dev/urandom > /srv/lab/bulk$i; done",
    )
    wait_sync(built)  # capture drained; the stopped passive does not count
    journal = status(built)["journal"]
    assert journal["first"] > 2, f"the bound dropped nothing: {journal}"
    built.start("secondary")
    wait_connected(built)
    wait_until(lambda: peers(built)["secondary"]["state"] == "in sync", 120, "reset and full check")
    wait_sync(built)
    assert_converged(built)
    assert_event(built, "primary", "check")


def test_passive_missing_a_file_asks_for_a_check(lab: Any) -> None:
    """A DELTA for a file someone deleted on the passive: skipped, reported, repaired."""
    built: Lab = lab(2)
    wait_connected(built)
    sh(built, "primary", "head -c 2000000 /dev/urandom > /srv/lab/big && echo a > /srv/lab/a")
    wait_sync(built)
    sh(built, "secondary", "rm /srv/lab/big")
    sh(
        built,
        "primary",
        "printf Z | dd of=/srv/lab/big bs=1 seek=1000 conv=notrunc status=none; "
        "echo b > /srv/lab/b",
    )
    wait_until(
        lambda: (
            status(built, "secondary")["nodes"][0]["out_of_sync"] is False
            and peers(built)["secondary"]["state"] == "in sync"
        ),
        120,
        "the check the passive asked for",
    )
    wait_sync(built)
    assert_converged(built)
    assert_event(built, "secondary", "out-of-sync")


def test_check_skips_a_disconnected_passive_and_says_so(lab: Any) -> None:
    built: Lab = lab(3)
    wait_connected(built)
    built.stop("tertiary")
    wait_until(lambda: peers(built)["tertiary"]["state"] == "disconnected", 30, "the stop")
    result = stead(built, "primary", "check")
    assert result.returncode == 0, result.stderr
    assert "tertiary is not connected" in result.stdout
    assert "full check of secondary" in result.stdout
    alone = stead(built, "primary", "check", "--node", "tertiary")
    assert alone.returncode != 0
    assert "not connected" in alone.stderr
