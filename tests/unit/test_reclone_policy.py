"""Automatic reclone decisions: table tests of the pure policy."""

from __future__ import annotations

import pytest

from stead.config.reclone import AutoSection
from stead.reclone.policy import Observed, Trigger, decide

ALL = AutoSection(enabled=True, out_of_sync_after=600, on_drift=True, on_packages=True)
PASSIVES = ("tertiary", "secondary")


@pytest.mark.parametrize(
    ("observed", "auto", "expected"),
    [
        pytest.param(Observed(1000, PASSIVES), ALL, [], id="nothing-to-do"),
        pytest.param(
            Observed(1000, PASSIVES, packages_changed=True),
            AutoSection(on_packages=True),
            [],
            id="disabled",
        ),
        pytest.param(
            Observed(1000, PASSIVES, packages_changed=True),
            ALL,
            [Trigger(PASSIVES, "the active's installed packages changed")],
            id="packages-all-passives",
        ),
        pytest.param(
            Observed(1000, PASSIVES, out_of_sync_since={"secondary": 100}),
            ALL,
            [Trigger(("secondary",), "out of sync for 900 s")],
            id="out-of-sync-beyond-the-bound",
        ),
        pytest.param(
            Observed(1000, PASSIVES, out_of_sync_since={"secondary": 500}),
            ALL,
            [],
            id="out-of-sync-within-the-bound",
        ),
        pytest.param(
            Observed(1000, PASSIVES, drifted=frozenset({"tertiary"})),
            ALL,
            [Trigger(("tertiary",), "its system trees drifted from the active's")],
            id="drift",
        ),
        pytest.param(
            Observed(1000, PASSIVES, drifted=frozenset({"tertiary"})),
            AutoSection(enabled=True, on_packages=True),
            [],
            id="drift-policy-off",
        ),
        pytest.param(
            Observed(1000, PASSIVES, drifted=frozenset({"tertiary"}), running=True),
            ALL,
            [],
            id="a-reclone-runs",
        ),
        pytest.param(
            Observed(1000, PASSIVES, drifted=frozenset({"tertiary"}), last_attempt={"tertiary": 0}),
            ALL,
            [],
            id="cooldown",
        ),
        pytest.param(
            Observed(5000, PASSIVES, drifted=frozenset({"tertiary"}), last_attempt={"tertiary": 0}),
            ALL,
            [Trigger(("tertiary",), "its system trees drifted from the active's")],
            id="after-the-cooldown",
        ),
        pytest.param(
            Observed(
                1000,
                PASSIVES,
                packages_changed=True,
                drifted=frozenset({"tertiary"}),
                out_of_sync_since={"tertiary": 0},
            ),
            ALL,
            [Trigger(PASSIVES, "the active's installed packages changed")],
            id="one-reason-per-node",
        ),
    ],
)
def test_decide(observed: Observed, auto: AutoSection, expected: list[Trigger]) -> None:
    assert decide(observed, auto) == expected
