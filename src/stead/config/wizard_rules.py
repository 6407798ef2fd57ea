"""The wizard's rules are the schema's: every answer is judged by validating a whole cluster.

A draft is the plain data of a ``cluster.toml`` (what ``tomllib`` reads), possibly still
incomplete while the wizard runs. To judge one answer, :func:`answer_error` puts it into a
copy of the draft, fills in what a half-made draft still lacks (a second node, a protected
path, the active node) with harmless stand-ins, validates the copy with
:class:`~stead.config.schema.ClusterConfig`, and reports only the errors about that answer:
those located at its key, the cluster-wide rules (unique names, overlapping paths, the
failover timeout against the heartbeat), and those of the enclosing object that the question
names. The rest of the draft was valid before, so whatever else is wrong is this answer's
doing. No rule is written twice, so the wizard and ``stead config check`` cannot disagree.
"""

from __future__ import annotations

import copy
import itertools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from stead.config.schema import ClusterConfig
from stead.errors import ConfigError

Loc = tuple[str | int, ...]


class _Remove:
    """An answer that removes its key (an empty optional value)."""

    def __repr__(self) -> str:
        return "REMOVE"


REMOVE: Any = _Remove()
PROBE_PROTECTED = "/nonexistent/stead-wizard-probe"


def loc_text(loc: Iterable[str | int]) -> str:
    """``('nodes', 1, 'name')`` -> ``nodes.1.name``, as ``stead config check`` names keys."""
    return ".".join(str(part) for part in loc) or "(top level)"


def error_text(error: Mapping[str, Any]) -> str:
    """A pydantic error's reason, in the words ``stead config check`` uses."""
    if error.get("type") == "extra_forbidden":
        return "unknown key (misspelt?)"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def problems(exc: ValidationError, data: Mapping[str, Any] | None = None) -> list[str]:
    """Each error as ``key: reason``; with the data, an entry of a list is named too."""
    found = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        where = loc_text(loc)
        if data is not None and len(loc) >= 2 and isinstance(loc[1], int):
            entry = get_at(data, loc[:2])
            name = entry.get("name", entry.get("path")) if isinstance(entry, dict) else None
            if isinstance(name, str) and name:
                where += f" ({name})"
        found.append(f"{where}: {error_text(error)}")
    return found


def get_at(data: Any, loc: Loc, default: Any = None) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def set_at(data: dict[str, Any], loc: Loc, value: Any) -> None:
    """Set ``value`` at ``loc``, making the tables on the way; :data:`REMOVE` deletes the key."""
    target: Any = data
    for part, following in itertools.pairwise(loc):
        if isinstance(target, dict) and part not in target:
            target[part] = [] if isinstance(following, int) else {}
        target = target[part]
    last = loc[-1]
    if value is REMOVE:
        if isinstance(target, dict):
            target.pop(last, None)
        elif isinstance(target, list) and isinstance(last, int) and last < len(target):
            target.pop(last)
        return
    if isinstance(target, list) and isinstance(last, int) and last == len(target):
        target.append(value)
    else:
        target[last] = value


def unique_name(stem: str, taken: Iterable[str]) -> str:
    used = set(taken)
    number = 1
    while f"{stem}{number}" in used:
        number += 1
    return f"{stem}{number}"


def _probe_ready(data: dict[str, Any], loc: Loc) -> None:
    """Fill in what a draft lacks only because the wizard has not asked for it yet."""
    nodes = data.setdefault("nodes", [])
    if isinstance(nodes, list):
        names = [n.get("name", "") for n in nodes if isinstance(n, dict)]
        while len(nodes) < 2:
            name = unique_name("probe-", names)
            names.append(name)
            nodes.append({"name": name, "addresses": ["192.0.2.1"]})
        cluster = data.setdefault("cluster", {})
        if loc[:2] != ("cluster", "active") and cluster.get("active") not in names:
            cluster["active"] = names[0]
    protected = data.setdefault("protected", [])
    if isinstance(protected, list) and not protected:
        protected.append({"path": PROBE_PROTECTED})


def answer_error(
    draft: dict[str, Any], loc: Loc, value: Any, also: Iterable[Loc] = ()
) -> str | None:
    """Why ``value`` cannot go to ``loc`` in ``draft`` (``None``: it can).

    ``also`` names enclosing objects whose own rules this answer completes (the interface
    that must come with an address, a check's timeout against its interval).
    """
    data = copy.deepcopy(draft)
    set_at(data, loc, value)
    _probe_ready(data, loc)
    scopes = set(also)
    try:
        ClusterConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            where = tuple(error["loc"])
            if where[: len(loc)] == loc or where in scopes or where == ():
                return error_text(error)
    return None


def validate_draft(draft: Mapping[str, Any], source: str) -> ClusterConfig:
    """The draft as a validated configuration, or a ConfigError naming every bad key."""
    try:
        return ClusterConfig.model_validate(draft)
    except ValidationError as exc:
        found = problems(exc, draft)
        raise ConfigError(
            "; ".join(found), file=source, problems=[f"{source}: {p}" for p in found]
        ) from None


def describe(loc: Loc) -> str:
    """The schema's description of the key at ``loc`` ("" when it has none)."""
    field = _field(loc)
    return (field.description or "") if field is not None else ""


def schema_default(loc: Loc) -> Any:
    """The schema's default of the key at ``loc`` (``None`` when it has none)."""
    field = _field(loc)
    if field is None or field.is_required():
        return None
    return field.get_default(call_default_factory=True)


def current_value(draft: Mapping[str, Any], loc: Loc) -> Any:
    """The value at ``loc``, or the default the schema gives it when the key is absent."""
    missing = object()
    found = get_at(draft, loc, missing)
    return schema_default(loc) if found is missing else found


def _field(loc: Loc) -> FieldInfo | None:
    model: type[BaseModel] | None = ClusterConfig
    field: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _model_of(field.annotation)
    return field


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (
        list,
        typing.Union,
    ):
        for inner in typing.get_args(annotation):
            found = _model_of(inner)
            if found is not None:
                return found
    return None
