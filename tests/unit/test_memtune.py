"""The agent's allocator tuning: large buffers are reused, not mapped and zeroed again."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

CHURN = """
import resource, sys
from stead.memtune import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else []
def churn():
    for _ in range(40):
        buffers = [b"x" * (1 << 20) for _ in range(12)]  # a batch of records in flight
        del buffers
churn()  # the first round sets glibc's own dynamic thresholds
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, ",".join(applied))
"""


def _faults(mode: str, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    faults, _, applied = done.stdout.strip().partition(" ")
    return int(faults), applied


def test_tuned_allocator_reuses_large_buffers() -> None:
    plain, _ = _faults("plain")
    tuned, applied = _faults("tuned")
    assert applied == "malloc_mmap_threshold,malloc_trim_threshold"
    # 40 rounds x 12 MiB: untuned, the heap is trimmed and faulted in again every round.
    assert plain > 40 * 12 * 256 // 2, plain
    assert tuned < plain // 10, (tuned, plain)


def test_an_administrators_setting_is_left_alone() -> None:
    _, applied = _faults("tuned", MALLOC_TRIM_THRESHOLD_="1048576")
    assert applied == "malloc_mmap_threshold"


OPEN_FILES = """
import resource, sys
from stead.memtune import raise_open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
now = raise_open_files()
print(now, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _open_files(soft: int, hard: int) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", OPEN_FILES, str(soft), str(hard)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(x) for x in done.stdout.split()]


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(hard, 4096)  # a hard limit this test may set (raising one needs a capability)
    assert _open_files(256, lower) == [lower, lower, lower]
    want = min(hard, 65536)  # capped
    assert _open_files(1024, hard) == [want, want, hard]


def test_the_open_file_limit_is_never_lowered() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert _open_files(hard, hard) == [hard, hard, hard]


def test_the_collector_runs_less_often_and_skips_what_lives_as_long_as_the_agent() -> None:
    script = (
        "import gc\nfrom stead.memtune import tune_gc, GC_YOUNG\n"
        "before = gc.get_threshold()[0]\nnow = tune_gc()\n"
        "print(before, now[0] == GC_YOUNG, gc.get_freeze_count() > 1000)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["700", "True", "True"]
