"""Configuration of protected services and their health checks (``[[services]]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ServiceAction = Literal["restart", "switchover", "alert"]


def _default_actions() -> list[ServiceAction]:
    return ["restart", "restart", "switchover"]


class HealthCheck(_Strict):
    """One health check of a service: what to probe, how often, and what to do on failure."""

    kind: Literal["systemd", "tcp", "http", "command"]
    unit: str = Field(default="", description="systemd: unit to ask (default: the service's unit)")
    host: str = Field(default="127.0.0.1", description="tcp and http: address to connect to")
    port: int = Field(default=0, ge=0, le=65535, description="tcp: port to connect to")
    url: str = Field(default="", description="http: URL to GET")
    expect_status: int = Field(default=200, ge=100, le=599, description="http: expected status")
    argv: list[str] = Field(default_factory=list, description="command: exit status 0 is healthy")
    interval: float = Field(default=2.0, gt=0, le=3600, description="seconds between checks")
    timeout: float = Field(default=1.0, gt=0, le=600, description="seconds one check may take")
    failures: int = Field(
        default=3, ge=1, le=100, description="consecutive failures before the next action"
    )
    actions: list[ServiceAction] = Field(
        default_factory=_default_actions,
        max_length=3,
        description="up to three actions, one per run of failures",
    )
    reset_after: float = Field(
        default=300.0, gt=0, description="seconds of health after which the action counter resets"
    )

    @model_validator(mode="after")
    def _target(self) -> HealthCheck:
        if self.kind == "tcp" and not self.port:
            raise ValueError("a tcp check needs port")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise ValueError("an http check needs url (http:// or https://)")
        if self.kind == "command" and not self.argv:
            raise ValueError("a command check needs argv")
        if self.timeout > self.interval:
            raise ValueError(f"timeout ({self.timeout} s) must not exceed interval")
        return self


class ServiceSpec(_Strict):
    """A protected service: started in order on the active, stopped in reverse, kept stopped
    on passives. Exactly one way to control it: ``unit`` (systemd), ``exec`` (a process the
    agent supervises) or ``start``/``stop``/``status`` commands."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    unit: str = Field(default="", description="systemd unit, e.g. nginx.service")
    exec: list[str] = Field(default_factory=list, description="argv of a supervised process")
    start: list[str] = Field(default_factory=list, description="argv that starts the service")
    stop: list[str] = Field(default_factory=list, description="argv that stops the service")
    status: list[str] = Field(
        default_factory=list, description="argv whose exit status 0 means running"
    )
    start_timeout: float = Field(default=30.0, gt=0, le=3600)
    stop_timeout: float = Field(default=30.0, gt=0, le=3600)
    checks: list[HealthCheck] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_control(self) -> ServiceSpec:
        ways = [bool(self.unit), bool(self.exec), bool(self.start or self.stop or self.status)]
        if sum(ways) != 1:
            raise ValueError("give exactly one of unit, exec, or start/stop/status commands")
        if (self.start or self.stop or self.status) and not (
            self.start and self.stop and self.status
        ):
            raise ValueError("start, stop and status commands go together")
        for check in self.checks:
            if check.kind == "systemd" and not (check.unit or self.unit):
                raise ValueError("a systemd check needs unit (on the check or on the service)")
        return self

    def resolved_checks(self) -> list[HealthCheck]:
        """The checks with defaults taken from the service filled in (a systemd check's unit)."""
        return [
            check.model_copy(update={"unit": self.unit})
            if check.kind == "systemd" and not check.unit
            else check
            for check in self.checks
        ]
