"""Protected services: started in order on the active, stopped on passives, watched by checks.

``config`` holds their configuration, ``control`` the seam that starts and stops one service
(supervised process, commands, systemd unit), ``health`` the probes, ``rules`` what to do
about failed probes, and ``manager`` ties them together for the agent.
"""

from stead.errors import ServiceError
from stead.services.config import HealthCheck, ServiceAction, ServiceSpec
from stead.services.control import (
    Commands,
    ServiceControl,
    SupervisedProcess,
    Systemd,
    control_for,
)
from stead.services.health import describe_check, probe
from stead.services.manager import ServiceManager
from stead.services.rules import Policy, Rule, RuleState, Step, decide

__all__ = [
    "Commands",
    "HealthCheck",
    "Policy",
    "Rule",
    "RuleState",
    "ServiceAction",
    "ServiceControl",
    "ServiceError",
    "ServiceManager",
    "ServiceSpec",
    "Step",
    "SupervisedProcess",
    "Systemd",
    "control_for",
    "decide",
    "describe_check",
    "probe",
]
