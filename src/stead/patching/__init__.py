"""Rolling patches: ``stead patch`` runs a command on every node, one at a time, while the
cluster keeps serving.

``plan`` is pure: from the cluster configuration, the current active and the operator's
options it makes the ordered list of steps (no I/O), which ``--dry-run`` prints. ``run``
carries a plan out through two small seams, the cluster's agents and a command runner, and
stops at the first step that fails, saying where. ``agents`` holds the real seams.
"""

from __future__ import annotations

from stead.patching.plan import PatchOptions, Plan, Step, build_plan, connect_argv
from stead.patching.run import CommandResult, Report, StepResult, execute

__all__ = [
    "CommandResult",
    "PatchOptions",
    "Plan",
    "Report",
    "Step",
    "StepResult",
    "build_plan",
    "connect_argv",
    "execute",
]
