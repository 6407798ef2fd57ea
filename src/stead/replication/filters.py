"""Include/exclude filters: which paths under a protected root are replicated.

Paths are relative to the root, POSIX, ``str`` from :func:`os.fsdecode` (non-UTF-8 bytes
survive as surrogate escapes). Glob syntax, compiled to one regular expression per pattern
when the filter is built:

- ``*`` matches any run of characters within one path component, ``?`` one character;
- ``**`` as a whole component matches any number of components, zero included
  (``**/x``, ``a/**``, ``a/**/b``);
- a pattern without ``/`` matches the last component at any depth (``*.tmp`` excludes
  ``a/b/c.tmp``), as in ``.gitignore``;
- a pattern that matches a directory also matches everything under it (include ``etc/nginx``
  protects the whole tree; exclude ``cache`` drops it with its contents).

A path is protected when it matches some include (default ``["**"]``) and no exclude.
A directory is also protected when it could contain an included path (include
``data/*.conf`` protects directory ``data``): the passive then gets it with its owner and
mode before any child arrives, and capture knows to traverse and watch it. The reserved name
``.stead`` at the root (the applier's staging area) is always excluded.

Deciding is pure and cheap; nothing here touches the file system except :meth:`Filter.walk`.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stead.errors import ConfigError

log = logging.getLogger(__name__)

RESERVED = ".stead"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a path is protected, and which rule said so (for logs and ``stead explain``)."""

    protected: bool
    rule: str


@dataclass(frozen=True, slots=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]  # the path itself or anything under it
    parts: tuple[re.Pattern[str] | None, ...]  # per component; None stands for ``**``


def _component_regex(part: str) -> str:
    out: list[str] = []
    for char in part:
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
    return "".join(out)


def _compile(text: str) -> _Pattern:
    pattern = text.strip().strip("/")
    if not pattern:
        raise ConfigError(f"empty filter pattern {text!r}")
    if "/" not in pattern and pattern != "**":
        pattern = "**/" + pattern
    parts: list[str] = []
    for part in pattern.split("/"):
        if not (part == "**" and parts and parts[-1] == "**"):  # "**/**" is "**"
            parts.append(part)
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"filter pattern {text!r} has an empty, '.' or '..' component")
    pieces: list[str] = []
    for index, part in enumerate(parts):
        if part == "**":
            # Zero or more whole components, with the separators that go with them.
            if len(parts) == 1:
                pieces.append(".*")
            elif index == 0:
                pieces.append("(?:[^/]+/)*")
            elif index == len(parts) - 1:
                pieces.append("(?:/[^/]+)*")
            else:
                pieces.append("(?:/[^/]+)*/")
        else:
            if index > 0 and parts[index - 1] != "**":
                pieces.append("/")
            pieces.append(_component_regex(part))
    regex = re.compile("(?:" + "".join(pieces) + ")(?:/.*)?", re.DOTALL)
    compiled = tuple(
        None if part == "**" else re.compile(_component_regex(part), re.DOTALL) for part in parts
    )
    return _Pattern(text=text, regex=regex, parts=compiled)


def _could_contain(pattern: _Pattern, dir_parts: list[str]) -> bool:
    """True when some path strictly under ``dir_parts`` could match ``pattern``.

    A small NFA over pattern components: ``**`` may consume a directory component or
    nothing. If some state is left with pattern components still to match, a descendant
    could match them.
    """
    parts = pattern.parts

    def closure(states: set[int]) -> set[int]:
        out = set(states)
        pending = list(states)
        while pending:
            index = pending.pop()
            if index < len(parts) and parts[index] is None and index + 1 not in out:
                out.add(index + 1)
                pending.append(index + 1)
        return out

    states = closure({0})
    for name in dir_parts:
        advanced: set[int] = set()
        for index in states:
            if index >= len(parts):
                continue
            part = parts[index]
            if part is None:
                advanced.add(index)
            elif part.fullmatch(name):
                advanced.add(index + 1)
        states = closure(advanced)
        if not states:
            return False
    return any(index < len(parts) for index in states)


class Filter:
    """Include/exclude globs over paths relative to one protected root."""

    __slots__ = ("_any_exclude", "_any_include", "_excludes", "_includes", "exclude", "include")

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None):
        self.include = list(include) if include else ["**"]
        self.exclude = list(exclude or [])
        self._includes = [_compile(text) for text in self.include]
        self._excludes = [_compile(text) for text in self.exclude]
        # One alternation per side, so that walking a million files costs two regex
        # matches per path; the rule that decided is looked up only when asked for.
        self._any_include = re.compile("|".join(p.regex.pattern for p in self._includes), re.DOTALL)
        self._any_exclude = (
            re.compile("|".join(p.regex.pattern for p in self._excludes), re.DOTALL)
            if self._excludes
            else None
        )

    def __repr__(self) -> str:
        return f"Filter(include={self.include!r}, exclude={self.exclude!r})"

    def decide(self, relpath: str, is_dir: bool) -> Decision:
        """Say whether ``relpath`` is protected and which rule decided."""
        if relpath == RESERVED or relpath.startswith(RESERVED + "/"):
            return Decision(False, "reserved")
        for pattern in self._excludes:
            if pattern.regex.fullmatch(relpath):
                return Decision(False, f'exclude "{pattern.text}"')
        for pattern in self._includes:
            if pattern.regex.fullmatch(relpath):
                return Decision(True, f'include "{pattern.text}"')
        if is_dir:
            parts = relpath.split("/")
            for pattern in self._includes:
                if _could_contain(pattern, parts):
                    return Decision(True, f'include "{pattern.text}" (parent)')
        return Decision(False, "default")

    @property
    def include_pattern(self) -> str:
        """One regular expression that every path an include glob matches fully matches."""
        return self._any_include.pattern

    def protected(self, relpath: str, is_dir: bool) -> bool:
        """The fast form of :meth:`decide` for hot paths (walks, event handling)."""
        if relpath == RESERVED or relpath.startswith(RESERVED + "/"):
            return False
        if self._any_exclude is not None and self._any_exclude.fullmatch(relpath):
            return False
        if self._any_include.fullmatch(relpath):
            return True
        if is_dir:
            parts = relpath.split("/")
            return any(_could_contain(pattern, parts) for pattern in self._includes)
        return False

    def walk(
        self, root: Path, *, under: str = "", strict: bool = False
    ) -> Iterator[tuple[str, os.stat_result]]:
        """Yield every protected entry under ``root`` (or its subdirectory ``under``).

        Each comes with its ``lstat``; ``under`` itself is not yielded.

        Directories, regular files, symlinks and special files alike; symlinks are never
        followed. Order is deterministic: names sorted by their bytes, each directory before
        its contents (depth first). Entries that vanish while walking are skipped, as the
        change that removed them is seen by capture on its own.
        """
        stack: list[Iterator[tuple[str, os.stat_result]]] = [self._children(root, under, strict)]
        while stack:
            try:
                relpath, st = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            yield relpath, st
            # Listed only after the consumer has seen (and perhaps watched) the directory.
            if stat.S_ISDIR(st.st_mode):
                stack.append(self._children(root, relpath, strict))

    def _children(
        self, root: Path, reldir: str, strict: bool = False
    ) -> Iterator[tuple[str, os.stat_result]]:
        directory = os.path.join(root, reldir) if reldir else os.fspath(root)
        try:
            with os.scandir(directory) as scan:
                found = [(os.fsencode(entry.name), entry) for entry in scan]
        except (FileNotFoundError, NotADirectoryError):
            if strict and not reldir:
                raise  # the root itself is gone: nothing may be concluded from its absence
            return
        except OSError as exc:
            if strict:
                raise
            log.warning("cannot list %s: %s", directory, exc)
            return
        found.sort(key=lambda item: item[0])
        for _, entry in found:
            relpath = f"{reldir}/{entry.name}" if reldir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if self.protected(relpath, stat.S_ISDIR(st.st_mode)):
                yield relpath, st
