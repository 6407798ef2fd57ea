"""``cluster.toml`` as a document: change only what differs, keep every comment, write atomically.

The wizard works on plain data (what ``tomllib`` reads). To write it back without losing the
operator's comments, :func:`sync_document` walks the parsed ``tomlkit`` document next to the
wanted data and touches only the keys whose values differ: a changed value keeps its comment
(moved so that it stays in its column), a new key is appended to its table, a key that is no
longer wanted is removed. Entries of arrays of tables (``[[nodes]]``, ``[[services]]``,
``[[protected]]``) are matched by their ``name`` or ``path``, so removing the second node does
not rewrite the third one under the second one's comments.

Duties:

- Atomicity: :func:`write_atomic` writes a temp file in the target's directory, fsyncs it,
  renames it over the target and fsyncs the directory, so a reader sees the old file or the
  new one, never a mix, even after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Array, InlineTable, Item, Table

from stead import fsutil

_IDENTITY_KEYS = ("name", "path")  # how entries of an array of tables are told apart
_INLINE = 99  # the depth of anything inside an inline table or an array


def sync_document(doc: tomlkit.TOMLDocument, data: Mapping[str, Any]) -> None:
    """Make ``doc`` hold exactly ``data``, changing as little of its text as possible."""
    _sync_table(doc, data, depth=0, in_entry=False)


def _sync_table(
    table: Container | Table | InlineTable, wanted: Mapping[str, Any], *, depth: int, in_entry: bool
) -> None:
    top = depth == 0
    for key in [key for key in table if key not in wanted]:
        del table[key]
    for key, value in wanted.items():
        if top and value == []:  # an empty list of sections: no [[services]] at all
            if key in table:
                del table[key]
            continue
        if key not in table:
            item = _new_item(value, depth=depth, in_entry=in_entry)
            ends_blank = table.as_string().endswith("\n\n")
            if top and isinstance(item, Table | AoT) and not ends_blank:
                table.add(tomlkit.nl())  # a new section after a blank line, as init writes
            elif not top and isinstance(item, Table) and ends_blank:
                item.add(tomlkit.nl())  # a new sub-table keeps the blank before what follows
            table[key] = item
            continue
        current = table[key]
        if isinstance(value, Mapping) and isinstance(current, Table | InlineTable):
            _sync_table(current, value, depth=depth + 1, in_entry=in_entry)
        elif _is_table_list(value) and isinstance(current, AoT):
            _sync_aot(current, value)
        elif not same_value(_plain(current), value):
            _replace(table, key, _new_item(value, depth=depth, in_entry=in_entry))


def _sync_aot(aot: AoT, wanted: Sequence[Mapping[str, Any]]) -> None:
    existing = [_plain(entry) for entry in aot]
    ident = _identity_key(existing, wanted)
    if ident is None:
        keep = list(range(min(len(existing), len(wanted))))
        for index in reversed(range(len(wanted), len(existing))):
            del aot[index]
        order_ok = True
    else:
        names = [entry.get(ident) for entry in existing]
        wanted_names = [entry.get(ident) for entry in wanted]
        for index in reversed(range(len(names))):
            if names[index] not in wanted_names:
                del aot[index]
                del names[index]
        # In place only when the survivors keep their order and every new entry comes last.
        order_ok = wanted_names[: len(names)] == names
        keep = list(range(len(names)))
    if not order_ok:
        by_name = {_plain(entry).get(ident): entry for entry in aot} if ident else {}
        rebuilt: list[Table] = []
        for entry in wanted:
            table = by_name.get(entry.get(ident)) if ident else None
            if table is None:
                table = tomlkit.table()
            _sync_table(table, entry, depth=1, in_entry=True)
            rebuilt.append(table)
        while len(aot):
            del aot[0]
        for table in rebuilt:
            _append_entry(aot, table)
        return
    for index in keep:
        _sync_table(aot[index], wanted[index], depth=1, in_entry=True)
    for entry in wanted[len(keep) :]:
        table = tomlkit.table()
        _sync_table(table, entry, depth=1, in_entry=True)
        _append_entry(aot, table)


def _append_entry(aot: AoT, table: Table) -> None:
    """Append a table, with the blank line before it that ``stead init`` puts between entries."""
    if not len(aot):
        aot.append(table)
        return
    last_ends_blank = aot[len(aot) - 1].as_string().endswith("\n\n")
    if not last_ends_blank and "\n" not in table.trivia.indent:
        table.trivia.indent = "\n" + table.trivia.indent
    if last_ends_blank and not table.as_string().endswith("\n\n"):
        table.add(tomlkit.nl())  # the blank line before whatever follows the entries
    aot.append(table)


def _identity_key(
    existing: Sequence[Mapping[str, Any]], wanted: Sequence[Mapping[str, Any]]
) -> str | None:
    for key in _IDENTITY_KEYS:
        values = [entry.get(key) for entry in [*existing, *wanted]]
        if all(isinstance(v, str) for v in values):
            olds = [entry[key] for entry in existing]
            news = [entry[key] for entry in wanted]
            if len(set(olds)) == len(olds) and len(set(news)) == len(news):
                return key
    return None


def _replace(table: Container | Table | InlineTable, key: str, item: Item) -> None:
    """Set a value; a comment after it stays in its column when the value's length changes."""
    old = table[key]
    old_width = len(old.as_string()) if isinstance(old, Item) else 0
    table[key] = item
    new = table[key]
    trivia = getattr(new, "trivia", None)
    if trivia is not None and trivia.comment and isinstance(new, Item):
        width = len(trivia.comment_ws) + old_width - len(new.as_string())
        trivia.comment_ws = " " * max(width, 1)


def _new_item(value: Any, *, depth: int, in_entry: bool) -> Any:
    """A tomlkit item in the style ``stead init`` writes, for a container at ``depth``.

    Sections are tables and lists of sections arrays of tables; a table in a section is a
    sub-table (``[public.dns]``); inside an entry of an array of tables, a table is an
    inline table (``management = { ... }``) and a list of tables an array of tables
    (``[[services.checks]]``); any other list of tables is an array of inline tables
    (``addresses = [{ ... }]``).
    """
    if isinstance(value, Mapping):
        if depth == 0 or (depth == 1 and not in_entry):
            table = tomlkit.table()
            for key, inner in value.items():
                table[key] = _new_item(inner, depth=depth + 1, in_entry=False)
            return table
        inline = tomlkit.inline_table()
        for key, inner in value.items():
            inline[key] = _new_item(inner, depth=_INLINE, in_entry=False)
        return inline
    if _is_table_list(value) and (depth == 0 or in_entry):
        aot = tomlkit.aot()
        for entry in value:
            table = tomlkit.table()
            _sync_table(table, entry, depth=1, in_entry=True)
            _append_entry(aot, table)
        return aot
    if isinstance(value, list):
        array = tomlkit.array()
        for inner in value:
            array.append(_new_item(inner, depth=_INLINE, in_entry=False))
        return array
    return tomlkit.item(value)


def _is_table_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(entry, Mapping) for entry in value)
    )


def _plain(item: Any) -> Any:
    """The plain Python value of a tomlkit item (tables as dicts, arrays as lists)."""
    if isinstance(item, Table | InlineTable | Container):
        return {key: _plain(value) for key, value in item.items()}
    if isinstance(item, AoT | Array | list):
        return [_plain(value) for value in item]
    if isinstance(item, Item):
        return item.unwrap()
    return item


def same_value(a: Any, b: Any) -> bool:
    """Equal values of the same types: 1, 1.0 and true are three different TOML values."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync of the directory.

    The file keeps the mode of the one it replaces (0644 less the umask for a new one).
    """
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fsutil.write_atomic(path, text.encode("utf-8"), mode)
