"""``[reclone]``: which clone provider rebuilds passives, and its settings.

``builtin`` (the default) copies the active's system trees over the channel (see
:mod:`stead.reclone.builtin`). ``libvirt`` clones the active's virtual machine into each
node's (see :mod:`stead.reclone.providers.libvirt`); it needs ``[reclone.libvirt]`` with the
domain of every node.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What the libvirt provider records as a node's own in its new domain's metadata.
LIBVIRT_PRESERVE_KEYS = ("hostname", "management_address", "node_key", "machine_id")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LibvirtSection(_Strict):
    uri: str = Field(default="qemu:///system", min_length=1, description="libvirt connection URI")
    domains: dict[str, str] = Field(description="node name -> libvirt domain name")
    shutdown_timeout: float = Field(default=60.0, gt=0, le=3600)
    preserve: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="per node: hostname, management_address, node_key (a path), machine_id",
    )

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: dict[str, str]) -> dict[str, str]:
        for node, domain in value.items():
            if not domain or "/" in domain:
                raise ValueError(f"node {node}: {domain!r} is not a domain name")
        names = list(value.values())
        if len(set(names)) != len(names):
            raise ValueError("two nodes share a domain")
        return value

    @model_validator(mode="after")
    def _preserve(self) -> LibvirtSection:
        for node, values in self.preserve.items():
            if node not in self.domains:
                raise ValueError(f"preserve.{node}: the node has no domain")
            unknown = sorted(set(values) - set(LIBVIRT_PRESERVE_KEYS))
            if unknown:
                raise ValueError(
                    f"preserve.{node}: unknown keys {', '.join(unknown)} "
                    f"(known: {', '.join(LIBVIRT_PRESERVE_KEYS)})"
                )
        return self


class AutoSection(_Strict):
    """Automatic reclone (see stead.reclone.policy); off unless ``enabled``."""

    enabled: bool = False
    interval: float = Field(default=300.0, ge=1, le=86400, description="seconds between looks")
    out_of_sync_after: float | None = Field(
        default=None, gt=0, description="seconds a passive may stay out of sync; none: off"
    )
    on_drift: bool = Field(default=False, description="reclone a passive whose trees drifted")
    on_packages: bool = Field(
        default=False, description="reclone every passive when the active's packages change"
    )
    cooldown: float = Field(
        default=3600.0, ge=0, description="seconds before a node is tried again automatically"
    )
    delete_original: bool = False


class RecloneSection(_Strict):
    auto: AutoSection = Field(default_factory=AutoSection)
    provider: Literal["builtin", "libvirt"] = Field(
        default="builtin", description="builtin (over the channel) or libvirt (VM clones)"
    )
    libvirt: LibvirtSection | None = None

    @model_validator(mode="after")
    def _needs_settings(self) -> RecloneSection:
        if self.provider == "libvirt" and self.libvirt is None:
            raise ValueError("provider libvirt needs [reclone.libvirt] with the nodes' domains")
        return self
