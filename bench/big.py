"""1 GiB of new 1 MiB files, from the first write until applied on the passive.

Baselines in the same run: raw TCP between the two nodes, the passive disk's rate (``dd``
with ``conv=fsync``), and ``rsync -a`` of the same files to an rsync daemon in the passive.
"""

from __future__ import annotations

from bench import labkit
from bench.labkit import GIB, MIB, PRIMARY, SECONDARY, Result

NAME = "big"
GOAL = ">= 0.8 of min(link, disk) and faster than rsync"


def run(quick: bool) -> Result:
    total = 256 * MIB if quick else GIB
    files = total // MIB
    result = Result(NAME, GOAL, "stead rate / min(link, disk); rsync time / stead time")
    with labkit.lab(NAME, disk_size="6G") as lab:
        link = labkit.link_throughput(lab, total)
        disk = labkit.disk_rate(lab, SECONDARY, total)
        cli = labkit.wait_sync_cli(lab)
        stead = labkit.nodeop(lab, PRIMARY, "write", "/srv/lab/big", files, MIB, 1000, 600)
        with labkit.rsync_daemon(lab) as url:
            rsync_s = labkit.rsync_push(lab, "/srv/lab/big", url)
    stead_s = stead["total_s"]
    rate = total / stead_s
    floor = min(link, disk)
    share, vs_rsync = rate / floor, rsync_s / stead_s
    result.ratio = share
    result.met = share >= 0.8 and vs_rsync > 1.0
    result.figures = {
        "data": f"{files} x 1 MiB = {labkit.mib(total)}",
        "stead": f"{labkit.secs(stead_s)} ({labkit.mib_s(rate)})",
        "stead write part": labkit.secs(stead["write_s"]),
        "link (raw TCP)": labkit.mib_s(link),
        "passive disk (dd fsync)": labkit.mib_s(disk),
        "rsync -a": f"{labkit.secs(rsync_s)} ({labkit.mib_s(total / rsync_s)})",
        "stead / min(link, disk)": f"{share:.2f}",
        "rsync / stead": f"{vs_rsync:.2f}",
        "wait-sync CLI, idle": labkit.secs(cli),
    }
    return result
