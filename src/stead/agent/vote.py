"""The voter's half of an election: may this node grant its vote to a candidate?

Pure like :func:`stead.agent.decide.decide`. A vote is what makes an epoch unique in a
cluster of three or more: each node grants each epoch to at most one candidate, and a
candidate promotes only with more than half of the votes. That holds only if the executor
persists ``voted_epoch`` and ``voted_for`` *before* it sends the grant, and keeps them across
restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

from stead.agent.decide import Observed, current_actives
from stead.config.schema import ClusterConfig


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """A candidate asks for a vote in ``epoch``, showing how far it has applied."""

    candidate: str
    epoch: int
    applied: int
    in_sync: bool


@dataclass(frozen=True, slots=True)
class Vote:
    granted: bool
    reason: str


def grant_vote(voter: Observed, request: VoteRequest, config: ClusterConfig, now: float) -> Vote:
    """Grant iff the epoch is new to the voter, not promised to another candidate, no
    active is heard, and the candidate has not applied less than an in-sync voter.

    On a grant the executor persists ``voted_epoch = request.epoch`` and
    ``voted_for = request.candidate`` before replying.
    """
    candidate, epoch = request.candidate, request.epoch
    if candidate not in {n.name for n in config.nodes}:
        return Vote(False, f"refused: {candidate!r} is not a configured node")
    if voter.role == "active":
        return Vote(False, f"refused: I am the active in epoch {voter.epoch}")
    if epoch <= voter.epoch:
        return Vote(False, f"refused: epoch {epoch} is not newer than my epoch {voter.epoch}")
    if epoch < voter.voted_epoch or (epoch == voter.voted_epoch and voter.voted_for != candidate):
        other = voter.voted_for or "another node"
        return Vote(False, f"refused: I already voted for {other} in epoch {voter.voted_epoch}")
    actives = current_actives(voter, config, now)
    if actives:
        top = max(actives, key=lambda p: (p.epoch, p.name))
        return Vote(False, f"refused: I still hear {top.name}, the active in epoch {top.epoch}")
    if voter.in_sync and request.applied < voter.applied:
        return Vote(
            False,
            f"refused: {candidate} applied {request.applied}, less than my {voter.applied}",
        )
    return Vote(True, f"granted: {candidate} for epoch {epoch}, and no active is heard")
