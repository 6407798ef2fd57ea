"""Fixtures shared by every test: a clean machine for lab tests, and the ``lab`` factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from stead.lab import Lab

IS_ROOT = os.geteuid() == 0

# No per-example deadline: on a busy two-core machine the first examples (imports, caches)
# can take longer than Hypothesis's 200 ms, which says nothing about the property.
settings.register_profile("stead", deadline=None)
settings.load_profile("stead")

LabFactory = Callable[..., Lab]


@pytest.fixture(scope="session", autouse=True)
def _no_lab_leftovers(request: pytest.FixtureRequest) -> None:
    """Remove what a crashed earlier run left (namespaces, links, loops, processes).

    Only as root, and only when the session has lab tests (marked ``cluster`` or using the
    ``lab`` fixture): a run of other tests must not take down a lab someone is using.
    """
    if not IS_ROOT:
        return
    if not any(
        "lab" in getattr(item, "fixturenames", ()) or item.get_closest_marker("cluster")
        for item in request.session.items
    ):
        return
    from stead.lab.nodes import down_all

    down_all()


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabFactory]:
    """Build labs in temporary directories; every one is taken down, even if a test fails.

    ``lab(n=3, agent_cmd=None, wait_ready=None, skip_init=None, disk_size="1G",
    failover_timeout=None)`` returns a running ``Lab``. ``agent_cmd`` defaults to
    ``$STEAD_LAB_AGENT_CMD``, then the real agent; ``failover_timeout`` (seconds) replaces the
    lab's default, for a test that restarts the active and must not see a failover.
    """
    made: list[Lab] = []

    def make(
        n: int = 3,
        *,
        agent_cmd: str | None = None,
        wait_ready: bool | None = None,
        skip_init: bool | None = None,
        disk_size: str = "1G",
        failover_timeout: float | None = None,
    ) -> Lab:
        if not IS_ROOT:
            pytest.skip("the lab needs root")
        built = Lab(
            tmp_path_factory.mktemp("lab"),
            agent_cmd=agent_cmd,
            wait_ready=wait_ready,
            skip_init=skip_init,
        )
        made.append(built)  # before `up`: a lab that fails half-way is taken down too
        built.up(n, disk_size, failover_timeout=failover_timeout)
        return built

    yield make
    failures = []
    for built in reversed(made):
        try:
            built.down()
        except Exception as exc:  # take down the others first, then report
            failures.append(exc)
    if failures:
        raise failures[0]
