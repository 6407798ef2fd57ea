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


class RecloneSection(_Strict):
    provider: Literal["builtin", "libvirt"] = Field(
        default="builtin", description="builtin (over the channel) or libvirt (VM clones)"
    )
    libvirt: LibvirtSection | None = None

    @model_validator(mode="after")
    def _needs_settings(self) -> RecloneSection:
        if self.provider == "libvirt" and self.libvirt is None:
            raise ValueError("provider libvirt needs [reclone.libvirt] with the nodes' domains")
        return self
