"""Table tests for decide() and grant_vote(): one row per rule, checked by action, not by log."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from stead.agent.decide import (
    Action,
    Campaign,
    Demote,
    Observed,
    PeerView,
    Promote,
    RequestSwitchover,
    SelfFence,
    StartCampaign,
    Stay,
    decide,
    next_epoch,
)
from stead.agent.vote import VoteRequest, grant_vote
from stead.config.schema import ClusterConfig

NOW = 100.0
T = 2.5  # the failover.timeout of these tables (set explicitly below)
NAMES = "abcde"


def cluster(n: int = 3, **failover: Any) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "cluster": {"name": "test", "id": "0123456789", "active": "a"},
            "protected": [{"path": "/srv"}],
            "nodes": [
                {"name": name, "addresses": [f"198.18.0.{i + 1}"]}
                for i, name in enumerate(NAMES[:n])
            ],
            "failover": {"timeout": T, **failover},
        }
    )


def peer(name: str, ago: float | None = 0.5, **fields: Any) -> PeerView:
    """A peer last heard ``ago`` seconds before NOW (None: never heard)."""
    values: dict[str, Any] = {
        "priority": 100,
        "automatic_failover": True,
        "role": "passive",
        "epoch": 4,
        "applied": 10,
        "in_sync": True,
        "sees_active": False,
        "witnesses_ok": None,
    }
    values.update(fields)
    return PeerView(name=name, last_heard=None if ago is None else NOW - ago, **values)


SILENT_ACTIVE = peer("b", ago=3.0, role="active")


def observed(*peers: PeerView, **fields: Any) -> Observed:
    """Node a, a passive in epoch 4 by default; peers: b, a silent active, and c, a passive."""
    values: dict[str, Any] = {
        "me": "a",
        "role": "passive",
        "epoch": 4,
        "voted_epoch": 4,
        "applied": 10,
        "in_sync": True,
        "priority": 100,
        "automatic_failover": True,
        "started": 0.0,
        "peers": peers or (SILENT_ACTIVE, peer("c")),
        "witnesses_ok": None,
        "witnesses_lost_since": None,
        "public_visible": None,
    }
    values.update(fields)
    return Observed(**values)


def active(*peers: PeerView, **fields: Any) -> Observed:
    """Node a, the active in epoch 4; peers b and c are passives heard just now."""
    fields.setdefault("role", "active")
    return observed(*(peers or (peer("b"), peer("c"))), **fields)


def check(action: Action, expected: Action | type[Action], *words: str) -> None:
    if isinstance(expected, type):
        assert type(action) is expected, action
    else:
        assert replace(action, reason="") == replace(expected, reason=""), action
    assert action.reason
    assert "\n" not in action.reason
    for word in words:
        assert word in action.reason, action.reason


# ---- active ---------------------------------------------------------------------------------


def test_active_stays_and_says_so() -> None:
    check(
        decide(active(), cluster(), NOW),
        Stay,
        "I am a, the active in epoch 4",
        "2 passives heard of 2",
    )


@pytest.mark.parametrize(
    ("peers", "expected"),
    [
        pytest.param(
            (peer("b", role="active", epoch=6), peer("c")), Demote(6, reason=""), id="newer-active"
        ),
        pytest.param(
            (peer("b", epoch=5), peer("c", epoch=7)), Demote(7, reason=""), id="newer-passive"
        ),
        pytest.param(
            (peer("b", ago=T, role="active", epoch=9), peer("c")), Stay, id="newer-unheard"
        ),
        pytest.param((peer("b", role="active", epoch=3),), Stay, id="older-active-stays"),
    ],
)
def test_active_demotes_for_a_newer_epoch(
    peers: tuple[PeerView, ...], expected: Action | type[Action]
) -> None:
    check(decide(active(*peers), cluster(), NOW), expected)


def test_two_actives_in_one_epoch_the_larger_name_steps_down() -> None:
    twin = peer("a", role="active")
    check(decide(active(twin, peer("c"), me="b"), cluster(), NOW), Demote(4, reason=""), "larger")
    check(decide(active(peer("b", role="active"), peer("c")), cluster(), NOW), Stay, "b also")


CUT_OFF: dict[str, Any] = {"witnesses_ok": False, "witnesses_lost_since": NOW - T / 2}
ALONE = (peer("b", ago=T / 2), peer("c", ago=None))


@pytest.mark.parametrize(
    ("fields", "peers", "failover", "expected"),
    [
        pytest.param(CUT_OFF, ALONE, {}, SelfFence, id="cut-off"),
        pytest.param({"witnesses_ok": False}, ALONE, {}, SelfFence, id="lost-since-start"),
        pytest.param(CUT_OFF, ALONE, {"self_fence": False}, Stay, id="self-fence-off"),
        pytest.param(
            {**CUT_OFF, "witnesses_lost_since": NOW - 1.0}, ALONE, {}, Stay, id="lost-too-briefly"
        ),
        pytest.param(CUT_OFF, (peer("b", ago=1.0), peer("c", ago=None)), {}, Stay, id="peer-heard"),
        pytest.param({**CUT_OFF, "started": NOW - 1.0}, ALONE, {}, Stay, id="just-started"),
        pytest.param({}, ALONE, {}, Stay, id="no-witnesses"),
        pytest.param({"witnesses_ok": True}, ALONE, {}, Stay, id="witnesses-answer"),
    ],
)
def test_active_fences_itself_only_when_cut_off_from_peers_and_witnesses(
    fields: dict[str, Any],
    peers: tuple[PeerView, ...],
    failover: dict[str, Any],
    expected: type[Action],
) -> None:
    check(decide(active(*peers, **fields), cluster(**failover), NOW), expected)


REACHES = peer("c", witnesses_ok=True)


@pytest.mark.parametrize(
    ("peers", "fields", "failover", "expected"),
    [
        pytest.param((peer("b"), REACHES), {}, {}, RequestSwitchover("c", 5, reason=""), id="to-c"),
        pytest.param(
            (peer("b", witnesses_ok=True, applied=9), REACHES),
            {},
            {},
            RequestSwitchover("c", 5, reason=""),
            id="most-applied",
        ),
        pytest.param(
            (peer("b", witnesses_ok=True, priority=50), REACHES),
            {},
            {},
            RequestSwitchover("b", 5, reason=""),
            id="priority",
        ),
        pytest.param((peer("b"), REACHES), {}, {"network_switchover": False}, Stay, id="off"),
        pytest.param((peer("b"), REACHES), {}, {"automatic": False}, Stay, id="automatic-off"),
        pytest.param((peer("b"), REACHES), {"maintenance": True}, {}, Stay, id="maintenance"),
        pytest.param((peer("b"), replace(REACHES, in_sync=False)), {}, {}, Stay, id="not-in-sync"),
        pytest.param(
            (peer("b"), replace(REACHES, maintenance=True)), {}, {}, Stay, id="peer-maint"
        ),
        pytest.param((peer("b"), peer("c", witnesses_ok=False)), {}, {}, Stay, id="nobody-reaches"),
    ],
)
def test_network_switchover(
    peers: tuple[PeerView, ...],
    fields: dict[str, Any],
    failover: dict[str, Any],
    expected: Action | type[Action],
) -> None:
    check(decide(active(*peers, **CUT_OFF, **fields), cluster(**failover), NOW), expected)


def test_network_switchover_in_two_nodes_hands_over_an_epoch_of_the_active() -> None:
    action = decide(active(REACHES, **CUT_OFF), cluster(2), NOW)
    check(action, RequestSwitchover("c", 6, reason=""), "switching over to c")


# ---- passive --------------------------------------------------------------------------------


def test_passive_follows_a_heard_active() -> None:
    follows = observed(peer("b", role="active"), peer("c"))
    check(decide(follows, cluster(), NOW), Stay, "b is the active in epoch 4")
    newer = observed(peer("b", role="active", epoch=7), peer("c"))
    check(decide(newer, cluster(), NOW), Stay, "epoch 7")
    campaigning = replace(follows, campaign=Campaign(5, frozenset("ac")))
    check(decide(campaigning, cluster(), NOW), Stay, "b is the active")


def test_a_stale_active_of_an_older_epoch_is_not_followed() -> None:
    stale = observed(peer("b", role="active", epoch=3), peer("c"), started=NOW - 10)
    check(decide(stale, cluster(), NOW), StartCampaign(5, reason=""))


@pytest.mark.parametrize(
    ("fields", "peers", "expected"),
    [
        pytest.param({}, (peer("b", ago=2.0, role="active"), peer("c")), Stay, id="silent-briefly"),
        pytest.param({"started": NOW - 2.0}, (peer("b", ago=None), peer("c")), Stay, id="started"),
        pytest.param(
            {"started": NOW - T}, (peer("b", ago=None), peer("c")), StartCampaign, id="never-heard"
        ),
        pytest.param({}, (SILENT_ACTIVE, peer("c")), StartCampaign, id="silent"),
        pytest.param(
            {"active_heard": NOW - 1.0}, (peer("b"), peer("c")), Stay, id="active-stepped-down"
        ),
        pytest.param(
            {"active_heard": NOW - T}, (peer("b"), peer("c")), StartCampaign, id="stepped-down-long"
        ),
    ],
)
def test_passive_waits_for_the_active_to_be_silent_for_the_timeout(
    fields: dict[str, Any], peers: tuple[PeerView, ...], expected: type[Action]
) -> None:
    check(decide(observed(*peers, **fields), cluster(), NOW), expected)


def test_operator_forced_failover_bypasses_everything_but_a_heard_active() -> None:
    lonely = observed(peer("b", ago=None), peer("c", ago=None), started=NOW, in_sync=False)
    forced = replace(lonely, failover_to=9, maintenance=True)
    check(decide(forced, cluster(), NOW), Promote(9, reason=""), "operator")
    with_active = replace(forced, peers=(peer("b", role="active"), peer("c")))
    check(decide(with_active, cluster(), NOW), Stay, "b is the active")
    check(decide(replace(forced, failover_to=4), cluster(), NOW), Stay, "refusing")
    voted = replace(forced, voted_epoch=9, voted_for="c")
    check(decide(voted, cluster(), NOW), Stay, "refusing")


def test_handover_in_two_nodes_promotes_at_once() -> None:
    handed = observed(peer("b", ago=0.1, epoch=4), handover=5, started=NOW, in_sync=False)
    check(decide(handed, cluster(2), NOW), Promote(5, reason=""), "handed over")


def test_handover_in_three_nodes_runs_a_quick_election() -> None:
    handed = observed(peer("b"), peer("c"), handover=5, started=NOW)
    check(decide(handed, cluster(), NOW), StartCampaign(5, reason=""), "handed over")
    voted = replace(handed, voted_epoch=5, voted_for="a")
    one = replace(voted, campaign=Campaign(5, frozenset("a"), since=NOW - 1))
    check(decide(one, cluster(), NOW), Stay, "waiting for votes in epoch 5")
    two = replace(voted, campaign=Campaign(5, frozenset("ab"), since=NOW - 1))
    check(decide(two, cluster(), NOW), Promote(5, reason=""))
    late = replace(voted, campaign=Campaign(5, frozenset("ab"), since=NOW - T))
    check(decide(late, cluster(), NOW), Stay, "silent for 0.0 s")  # back to the ordinary rules


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"handover": 4}, id="not-newer"),
        pytest.param({"handover": 5, "voted_epoch": 5, "voted_for": "c"}, id="voted-for-another"),
        pytest.param({"handover": 5, "voted_epoch": 6}, id="voted-later"),
    ],
)
def test_a_stale_handover_is_ignored(fields: dict[str, Any]) -> None:
    handed = observed(peer("b"), peer("c"), started=NOW, **fields)
    check(decide(handed, cluster(2), NOW), Stay, "silent for 0.0 s")


@pytest.mark.parametrize(
    ("fields", "failover", "words"),
    [
        pytest.param({"maintenance": True}, {}, "maintenance", id="maintenance"),
        pytest.param({}, {"automatic": False}, "failover.automatic", id="automatic-off"),
        pytest.param({"automatic_failover": False}, {}, "nodes.automatic_failover", id="node"),
        pytest.param({"in_sync": False}, {}, "not in sync", id="not-in-sync"),
        pytest.param({"witnesses_ok": False}, {}, "witness", id="isolated"),
        pytest.param({"public_visible": True}, {}, "public address", id="public-visible"),
    ],
)
def test_passive_refuses_to_take_over(
    fields: dict[str, Any], failover: dict[str, Any], words: str
) -> None:
    check(decide(observed(**fields), cluster(**failover), NOW), Stay, words)


@pytest.mark.parametrize(
    ("fields", "failover"),
    [
        pytest.param({"in_sync": False}, {"require_sync": False}, id="sync-not-required"),
        pytest.param({"public_visible": True}, {"public_check": False}, id="public-unchecked"),
        pytest.param({"public_visible": False, "witnesses_ok": True}, {}, id="all-clear"),
    ],
)
def test_passive_takes_over_when_its_settings_allow(
    fields: dict[str, Any], failover: dict[str, Any]
) -> None:
    check(decide(observed(**fields), cluster(**failover), NOW), StartCampaign(5, reason=""))


@pytest.mark.parametrize(
    ("n", "peers", "expected"),
    [
        pytest.param(3, (SILENT_ACTIVE, peer("c", ago=None)), Stay, id="alone-of-3"),
        pytest.param(3, (SILENT_ACTIVE, peer("c", sees_active=True)), Stay, id="c-sees-active"),
        pytest.param(
            5, (SILENT_ACTIVE, peer("c"), peer("d", ago=None), peer("e", ago=T)), Stay, id="2-of-5"
        ),
        pytest.param(
            5, (SILENT_ACTIVE, peer("c"), peer("d"), peer("e", ago=T)), StartCampaign, id="3-of-5"
        ),
    ],
)
def test_passive_in_a_minority_stays(
    n: int, peers: tuple[PeerView, ...], expected: type[Action]
) -> None:
    action = decide(observed(*peers), cluster(n), NOW)
    check(action, expected, *(("minority",) if expected is Stay else ()))


@pytest.mark.parametrize(
    ("rival", "words"),
    [
        pytest.param(peer("c", applied=11), "applied 11", id="more-applied"),
        pytest.param(peer("c", priority=50), "priority 50", id="lower-priority"),
        pytest.param(peer("c", applied=11, priority=500), "applied 11", id="applied-first"),
    ],
)
def test_passive_defers_to_a_better_successor(rival: PeerView, words: str) -> None:
    check(decide(observed(SILENT_ACTIVE, rival), cluster(), NOW), Stay, "c is a better", words)


def test_name_breaks_ties_between_successors() -> None:
    check(decide(observed(me="c", peers=(SILENT_ACTIVE, peer("a"))), cluster(), NOW), Stay, "a is")


@pytest.mark.parametrize(
    "rival",
    [
        pytest.param(peer("c", applied=11, in_sync=False), id="not-in-sync"),
        pytest.param(peer("c", applied=11, maintenance=True), id="maintenance"),
        pytest.param(peer("c", applied=11, automatic_failover=False), id="no-automatic"),
        pytest.param(peer("c", applied=11, witnesses_ok=False), id="isolated"),
        pytest.param(peer("c", applied=11, ago=T), id="unheard"),
        pytest.param(peer("c", applied=11, sees_active=True), id="sees-active"),
    ],
)
def test_ineligible_peers_are_no_better_successors(rival: PeerView) -> None:
    peers = (SILENT_ACTIVE, rival, peer("d"), peer("e"))
    check(decide(observed(*peers), cluster(5), NOW), StartCampaign(5, reason=""))


def test_two_nodes_promote_directly_to_an_epoch_of_their_own() -> None:
    check(decide(observed(SILENT_ACTIVE, me="a"), cluster(2), NOW), Promote(6, reason=""))
    alone = observed(replace(SILENT_ACTIVE, name="a"), me="b")
    check(decide(alone, cluster(2), NOW), Promote(5, reason=""), "best successor")
    voted = replace(alone, voted_epoch=7)
    check(decide(voted, cluster(2), NOW), Promote(9, reason=""))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, StartCampaign(5, reason=""), id="first"),
        pytest.param({"voted_epoch": 7, "voted_for": "c"}, StartCampaign(8, reason=""), id="voted"),
        pytest.param({"campaign": Campaign(5, frozenset("a"), since=NOW - 1)}, Stay, id="waiting"),
        pytest.param(
            {"campaign": Campaign(5, frozenset("ac"), since=NOW - 1)},
            Promote(5, reason=""),
            id="majority",
        ),
        pytest.param(
            {"campaign": Campaign(5, frozenset({"a", "z"}), since=NOW - 1)},
            Stay,
            id="unknown-voter",
        ),
        pytest.param(
            {"campaign": Campaign(5, frozenset("a"), since=NOW - T)},
            StartCampaign(6, reason=""),
            id="expired",
        ),
        pytest.param(
            {"campaign": Campaign(4, frozenset("ac"))}, StartCampaign(5, reason=""), id="stale"
        ),
        pytest.param(
            {"campaign": Campaign(5, frozenset("ac")), "voted_for": "c"},
            StartCampaign(6, reason=""),
            id="vote-given-away",
        ),
    ],
)
def test_campaign(fields: dict[str, Any], expected: Action | type[Action]) -> None:
    if "campaign" in fields:
        fields = {"voted_epoch": fields["campaign"].epoch, "voted_for": "a", **fields}
    check(decide(observed(**fields), cluster(), NOW), expected)


def test_next_epoch() -> None:
    assert [next_epoch(cluster(2), "a", e) for e in range(4)] == [2, 2, 4, 4]
    assert [next_epoch(cluster(2), "b", e) for e in range(4)] == [1, 3, 3, 5]
    assert [next_epoch(cluster(3), "c", e) for e in range(3)] == [1, 2, 3]


# ---- votes ----------------------------------------------------------------------------------

VOTER = observed(peer("a", ago=None), peer("c"), me="b", voted_epoch=4, voted_for="b")
ASK = VoteRequest("a", 5, 10, True)


@pytest.mark.parametrize(
    ("voter", "request_", "granted", "words"),
    [
        pytest.param(VOTER, ASK, True, "granted", id="grant"),
        pytest.param(VOTER, replace(ASK, candidate="z"), False, "not a configured", id="unknown"),
        pytest.param(replace(VOTER, role="active"), ASK, False, "I am the active", id="active"),
        pytest.param(VOTER, replace(ASK, epoch=4), False, "not newer", id="old-epoch"),
        pytest.param(
            replace(VOTER, voted_epoch=5, voted_for="c"), ASK, False, "voted for c", id="taken"
        ),
        pytest.param(replace(VOTER, voted_epoch=5, voted_for="a"), ASK, True, "", id="same-again"),
        pytest.param(replace(VOTER, voted_epoch=6), ASK, False, "already voted", id="later"),
        pytest.param(
            replace(VOTER, peers=(peer("c", role="active"),)), ASK, False, "c, the active", id="hb"
        ),
        pytest.param(
            replace(VOTER, peers=(peer("c", role="active", epoch=3),)), ASK, True, "", id="stale"
        ),
        pytest.param(
            replace(VOTER, peers=(peer("c", ago=T, role="active"),)), ASK, True, "", id="silent"
        ),
        pytest.param(VOTER, replace(ASK, applied=9), False, "less than my 10", id="behind"),
        pytest.param(
            replace(VOTER, in_sync=False), replace(ASK, applied=9), True, "", id="behind-unsynced"
        ),
    ],
)
def test_grant_vote(voter: Observed, request_: VoteRequest, granted: bool, words: str) -> None:
    vote = grant_vote(voter, request_, cluster(), NOW)
    assert vote.granted is granted, vote.reason
    assert words in vote.reason
