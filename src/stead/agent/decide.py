"""The pure core of the decision cycle: what this node should do now, and why.

``decide(observed, config, now)`` reads one node's view of the cluster and returns an
:class:`Action` whose ``reason`` is the one sentence an operator sees for this cycle. It does
no I/O and reads no clock: ``now`` and every time in :class:`Observed` come from the same
monotonic clock, so tests run whole clusters on a logical one. ``grant_vote`` (in
:mod:`stead.agent.vote`) is the voter's half of an election, pure in the same way.

Epochs make "who is active" unambiguous: every promotion takes an epoch nobody else can take.
With three or more nodes a majority of votes guarantees that; with two nodes there is no
majority, so epochs are dealt out in turn (:func:`next_epoch`).

Duties of the executor, on which the safety of these rules rests:

- persist ``epoch``, ``voted_epoch`` and ``voted_for`` before it acts on them or replies to a
  vote request;
- ``StartCampaign(e)``: persist ``voted_epoch = e`` and ``voted_for = me``, open
  ``Campaign(e, {me}, since=now)``, send a vote request to every peer, resend it each cycle
  to those that have not granted, and add a voter to ``granted`` only for a grant in ``e``;
  drop the campaign when it promotes or demotes;
- ``RequestSwitchover(to, epoch)``: persist ``voted_epoch = epoch`` and ``voted_for = to``,
  become passive, then hand ``epoch`` over to ``to`` (its ``Observed.handover``);
- set ``active_heard = now`` on every heartbeat from an active whose epoch is at least this
  node's, and when this node stops being active;
- ``failover_to`` and ``handover`` are one-shot: clear them once the node is active in (or
  past) that epoch; ``peers`` lists every configured node but this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stead.config.schema import ClusterConfig

Role = Literal["active", "passive"]


@dataclass(frozen=True, slots=True)
class PeerView:
    """What this node last heard from one configured peer."""

    name: str
    priority: int
    automatic_failover: bool
    last_heard: float | None  # monotonic time of its last heartbeat on any channel; None: never
    role: Role
    epoch: int
    applied: int
    in_sync: bool
    sees_active: bool  # its last heartbeat says it heard an active within failover.timeout
    witnesses_ok: bool | None
    maintenance: bool = False


@dataclass(frozen=True, slots=True)
class Campaign:
    """An election this node runs for itself: the voters (me included) that granted ``epoch``."""

    epoch: int
    granted: frozenset[str]
    since: float | None = None  # monotonic start; a campaign not won within the timeout restarts


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything one cycle looks at, as seen by node ``me``."""

    me: str
    role: Role
    epoch: int
    voted_epoch: int
    applied: int
    in_sync: bool
    priority: int
    automatic_failover: bool
    started: float  # monotonic time the agent started
    peers: tuple[PeerView, ...]  # every configured peer, heard or not
    witnesses_ok: bool | None  # None: no witnesses configured; else one answered recently
    witnesses_lost_since: float | None  # since when no witness answered (None: some answer)
    public_visible: bool | None  # passive: something answers on the public address (None: unprobed)
    maintenance: bool = False
    campaign: Campaign | None = None
    handover: int | None = None  # an epoch the active handed to me in a switchover
    failover_to: int | None = None  # the operator forced a failover to me: the epoch to take
    voted_for: str = ""  # whom I granted voted_epoch to ("" for none)
    active_heard: float | None = None  # last heard an active of my epoch or newer, or was one


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """What the executor should do, with the sentence that explains it to an operator."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stay(Action):
    """Change nothing."""


@dataclass(frozen=True, slots=True)
class StartCampaign(Action):
    """Ask every peer for its vote in ``epoch`` (see the executor's duties above)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Promote(Action):
    """Become the active in ``epoch``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Demote(Action):
    """Another active exists: become passive, adopt ``epoch``, quarantine and resync."""

    epoch: int


@dataclass(frozen=True, slots=True)
class SelfFence(Action):
    """An active cut off from everything becomes passive in the same epoch."""


@dataclass(frozen=True, slots=True)
class RequestSwitchover(Action):
    """Hand the active role over to passive ``to``, which takes ``epoch``."""

    to: str
    epoch: int = 0


def decide(observed: Observed, config: ClusterConfig, now: float) -> Action:
    """The action for this cycle. Pure: the same arguments always give the same action."""
    if observed.role == "active":
        return _decide_active(observed, config, now)
    return _decide_passive(observed, config, now)


def next_epoch(config: ClusterConfig, node: str, after: int) -> int:
    """The smallest epoch above ``after`` that ``node`` may take or hand over.

    With three or more nodes, votes make an epoch unique, so this is ``after + 1``. Two nodes
    cannot outvote each other, and two passives that cannot hear each other would both take
    ``after + 1``; so node ``i`` (in name order) only ever takes epochs ``e`` with
    ``e % 2 == i``. Skipped epochs cost nothing.
    """
    names = sorted(n.name for n in config.nodes)
    if len(names) >= 3:
        return after + 1
    first = after + 1
    return first + (names.index(node) - first) % len(names)


def heard(peer: PeerView, config: ClusterConfig, now: float) -> bool:
    """A peer is heard if its last heartbeat is younger than the failover timeout."""
    return peer.last_heard is not None and now - peer.last_heard < config.failover.timeout


def current_actives(observed: Observed, config: ClusterConfig, now: float) -> list[PeerView]:
    """Heard peers that are active in my epoch or a newer one (an older active is stale)."""
    return [
        p
        for p in observed.peers
        if p.role == "active" and p.epoch >= observed.epoch and heard(p, config, now)
    ]


def _rank(applied: int, priority: int, name: str) -> tuple[int, int, str]:
    """Sort key, best successor first: most applied, then lowest priority, then name."""
    return (-applied, priority, name)


def _peer_rank(peer: PeerView) -> tuple[int, int, str]:
    return _rank(peer.applied, peer.priority, peer.name)


def _peer_epoch(observed: Observed) -> int:
    """The highest epoch held by me or reported by any peer (votes not included)."""
    return max([observed.epoch, *(p.epoch for p in observed.peers)])


def _free_for_me(observed: Observed, epoch: int) -> bool:
    """I have not granted ``epoch`` (or a later one) to anybody but myself."""
    return epoch > observed.voted_epoch or (
        epoch == observed.voted_epoch and observed.voted_for == observed.me
    )


def _votes(campaign: Campaign, config: ClusterConfig) -> int:
    return len(campaign.granted & {n.name for n in config.nodes})


def _witnesses_lost_for(observed: Observed, now: float) -> float | None:
    """Seconds since a witness last answered; None if one answers or none is configured."""
    if observed.witnesses_ok is not False:
        return None
    since = observed.witnesses_lost_since
    return now - (observed.started if since is None else since)


# ---- active -------------------------------------------------------------------------------


def _decide_active(o: Observed, config: ClusterConfig, now: float) -> Action:
    timeout = config.failover.timeout
    hearing = [p for p in o.peers if heard(p, config, now)]
    newer = [p for p in hearing if p.epoch > o.epoch]
    if newer:
        top = max(newer, key=lambda p: (p.epoch, p.role == "active", p.name))
        verb = "is active" if top.role == "active" else "follows an active"
        return Demote(
            top.epoch,
            reason=f"demoting: {top.name} {verb} in epoch {top.epoch}, newer than my "
            f"epoch {o.epoch}",
        )
    twins = sorted(p.name for p in hearing if p.role == "active" and p.epoch == o.epoch)
    if twins and twins[0] < o.me:
        return Demote(
            o.epoch,
            reason=f"demoting: {twins[0]} is also active in epoch {o.epoch}; of two actives "
            "in one epoch the one with the larger name steps down",
        )
    half = timeout / 2
    lost_for = _witnesses_lost_for(o, now)
    if lost_for is not None and lost_for >= half:
        contact = max([o.started, *(p.last_heard for p in o.peers if p.last_heard is not None)])
        if now - contact >= half:
            if config.failover.self_fence:
                return SelfFence(
                    reason=f"fencing myself: no peer heard for {now - contact:.1f} s and no "
                    f"witness answered for {lost_for:.1f} s; I am cut off"
                )
            return Stay(
                reason=f"no action: I am {o.me}, the active in epoch {o.epoch}, and look cut "
                "off (no peer, no witness), but failover.self_fence is off"
            )
        return _network_switchover(o, config, hearing, lost_for)
    passives = sum(p.role == "passive" for p in hearing)
    twin = f"; {', '.join(twins)} also active, steps down (larger name)" if twins else ""
    return Stay(
        reason=f"no action: I am {o.me}, the active in epoch {o.epoch}; {passives} passives "
        f"heard of {len(o.peers)} peers{twin}"
    )


def _network_switchover(
    o: Observed, config: ClusterConfig, hearing: list[PeerView], lost_for: float
) -> Action:
    """Peers hear me but I reach no witness: hand over to a passive that does."""
    lost = f"no witness answered me for {lost_for:.1f} s"
    targets = [
        p
        for p in hearing
        if p.role == "passive"
        and p.in_sync
        and p.witnesses_ok is True
        and p.automatic_failover
        and not p.maintenance
    ]
    if not targets:
        return Stay(
            reason=f"no action: I am {o.me}, the active in epoch {o.epoch}; {lost}, but "
            f"{len(hearing)} peers hear me and no passive in sync reaches a witness"
        )
    best = min(targets, key=_peer_rank)
    if o.maintenance:
        return Stay(reason=f"no action: {lost}, but I am in maintenance mode: no switchover")
    if not (config.failover.network_switchover and config.failover.automatic):
        setting = "network_switchover" if config.failover.automatic else "automatic"
        return Stay(
            reason=f"no action: {lost} while {best.name} reaches them, but failover.{setting} "
            "is off"
        )
    epoch = next_epoch(config, o.me, max(_peer_epoch(o), o.voted_epoch))
    return RequestSwitchover(
        best.name,
        epoch,
        reason=f"switching over to {best.name} in epoch {epoch}: {lost}, while it reaches "
        "them and is in sync",
    )


# ---- passive ------------------------------------------------------------------------------


def _decide_passive(o: Observed, config: ClusterConfig, now: float) -> Action:
    timeout = config.failover.timeout
    n = len(config.nodes)
    actives = current_actives(o, config, now)
    if actives:
        top = max(actives, key=lambda p: (p.epoch, p.name))
        return Stay(
            reason=f"no action: I am {o.me}, a passive; {top.name} is the active in epoch "
            f"{top.epoch}"
        )
    if o.failover_to is not None:
        return _forced(o, o.failover_to)
    handed = _handover(o, config, now)
    if handed is not None:
        return handed

    # An active that just stepped down reports itself passive: without active_heard its
    # passives, and itself, would see a silence as long as their uptime.
    last_active = max(
        [
            o.started,
            *([] if o.active_heard is None else [o.active_heard]),
            *(
                p.last_heard
                for p in o.peers
                if p.role == "active" and p.epoch >= o.epoch and p.last_heard is not None
            ),
        ]
    )
    silent = now - last_active
    if silent < timeout:
        return Stay(
            reason=f"no action: I am {o.me}, a passive; the active has been silent for "
            f"{silent:.1f} s of the {timeout:g} s failover timeout"
        )
    refusal = _refusal(o, config)
    if refusal:
        return Stay(
            reason=f"no action: the active has been silent for {silent:.1f} s, but {refusal}"
        )
    hearing = [p for p in o.peers if heard(p, config, now)]
    if n >= 3:
        supporters = 1 + sum(p.role == "passive" and not p.sees_active for p in hearing)
        if 2 * supporters <= n:
            return Stay(
                reason=f"no action: minority: {supporters} of {n} nodes (me included) are "
                "heard without an active; more than half are needed"
            )
    better = _better_successor(o, config, hearing)
    if better:
        return Stay(reason=f"no action: the active has been silent, but {better}")
    why = f"the active has been silent for {silent:.1f} s and I am the best successor"
    if n == 2:
        epoch = next_epoch(config, o.me, max(_peer_epoch(o), o.voted_epoch))
        return Promote(epoch, reason=f"promoting to epoch {epoch}: {why}")
    return _campaign(o, config, now, why)


def _forced(o: Observed, epoch: int) -> Action:
    known = _peer_epoch(o)
    if epoch <= known or not _free_for_me(o, epoch):
        taken = max(known, o.voted_epoch)
        return Stay(
            reason=f"no action: refusing the operator's failover to epoch {epoch}: epoch "
            f"{taken} is already known or voted for; ask again with a higher epoch"
        )
    return Promote(epoch, reason=f"promoting to epoch {epoch}: the operator forced a failover")


def _handover(o: Observed, config: ClusterConfig, now: float) -> Action | None:
    """Take a handed-over epoch; None when there is none or it went stale."""
    epoch = o.handover
    if epoch is None or epoch <= _peer_epoch(o) or not _free_for_me(o, epoch):
        return None
    n = len(config.nodes)
    if n == 2:
        return Promote(epoch, reason=f"promoting to epoch {epoch}: the active handed over to me")
    campaign = o.campaign
    if campaign is None or campaign.epoch != epoch:
        return StartCampaign(
            epoch, reason=f"asking for votes in epoch {epoch}: the active handed over to me"
        )
    if campaign.since is not None and now - campaign.since >= config.failover.timeout:
        return None  # the handover did not win in time; the ordinary rules take over
    votes = _votes(campaign, config)
    if 2 * votes > n:
        return Promote(
            epoch,
            reason=f"promoting to epoch {epoch}: the active handed over to me and {votes} of "
            f"{n} nodes voted for me",
        )
    return Stay(
        reason=f"no action: waiting for votes in epoch {epoch} after a handover: {votes} of "
        f"{n}, {n // 2 + 1} needed"
    )


def _refusal(o: Observed, config: ClusterConfig) -> str:
    """Why this node must not take over by itself ("" if nothing forbids it)."""
    failover = config.failover
    if o.maintenance:
        return "I am in maintenance mode"
    if not failover.automatic:
        return "failover.automatic is off"
    if not o.automatic_failover:
        return f"automatic failover to {o.me} is off (nodes.automatic_failover)"
    if failover.require_sync and not o.in_sync:
        return "I am not in sync (failover.require_sync)"
    if o.witnesses_ok is False:
        return "no witness answers me: I may be the one cut off"
    if failover.public_check and o.public_visible:
        return "something still answers on the public address (failover.public_check)"
    return ""


def _better_successor(o: Observed, config: ClusterConfig, hearing: list[PeerView]) -> str:
    """Name a heard passive that should take over rather than me ("" if I am the best)."""
    require_sync = config.failover.require_sync
    mine = _rank(o.applied, o.priority, o.me)
    better = [
        p
        for p in hearing
        if p.role == "passive"
        and p.automatic_failover
        and not p.maintenance
        and not p.sees_active
        and p.witnesses_ok is not False
        and (p.in_sync or not require_sync)
        and _peer_rank(p) < mine
    ]
    if not better:
        return ""
    best = min(better, key=_peer_rank)
    if best.applied != o.applied:
        return f"{best.name} is a better successor: it applied {best.applied}, I {o.applied}"
    if best.priority != o.priority:
        return (
            f"{best.name} is a better successor: same position, priority {best.priority} "
            f"before my {o.priority}"
        )
    return f"{best.name} is a better successor: same position and priority, name first"


def _campaign(o: Observed, config: ClusterConfig, now: float, why: str) -> Action:
    n = len(config.nodes)
    campaign = o.campaign
    known = max(_peer_epoch(o), o.voted_epoch)
    if campaign is None or campaign.epoch <= _peer_epoch(o) or not _free_for_me(o, campaign.epoch):
        epoch = next_epoch(config, o.me, known)
        return StartCampaign(epoch, reason=f"asking for votes in epoch {epoch}: {why}")
    votes = _votes(campaign, config)
    if 2 * votes > n:
        return Promote(
            campaign.epoch,
            reason=f"promoting to epoch {campaign.epoch}: {votes} of {n} nodes voted for me",
        )
    timeout = config.failover.timeout
    if campaign.since is not None and now - campaign.since >= timeout:
        epoch = next_epoch(config, o.me, max(known, campaign.epoch))
        return StartCampaign(
            epoch,
            reason=f"asking for votes in epoch {epoch}: epoch {campaign.epoch} got {votes} of "
            f"{n} votes in {timeout:g} s",
        )
    return Stay(
        reason=f"no action: waiting for votes in epoch {campaign.epoch}: {votes} of {n}, "
        f"{n // 2 + 1} needed"
    )
