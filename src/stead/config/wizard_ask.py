"""How the wizard asks: questions whose answers are checked against the schema as typed.

:class:`Questions` asks through an :class:`Asker`, the seam between the questions and the
screen: :class:`~stead.config.wizard_tui.TerminalAsker` draws them with prompt_toolkit, and
tests answer them from a script. Each question carries a ``check`` that the asker calls on
the text typed so far; the check puts the answer into a copy of the draft and validates it
with the schema (:func:`~stead.config.wizard_rules.answer_error`), so the asker can show why
an answer is refused while it is typed, and never accepts one the schema refuses.

An answer equal to the current value leaves the draft alone, so an edit in which nothing is
changed writes nothing, and a key that was absent stays absent.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stead.config.wizard_rules import (
    REMOVE,
    Loc,
    answer_error,
    current_value,
    describe,
    get_at,
    set_at,
)
from stead.config.wizard_toml import same_value

Check = Callable[[str], str | None]
Parse = Callable[[str], Any]
KEEP_EDIT_REMOVE = ("keep", "edit", "remove")


@dataclass(frozen=True)
class Prompt:
    """One question as the asker shows it."""

    label: str
    default: str = ""  # the text the answer starts with; Enter accepts it
    hint: str = ""  # what an empty answer means, shown while the answer is empty
    help: str = ""  # the schema's description of the key
    completions: tuple[str, ...] = ()
    complete_paths: bool = False


class Asker(Protocol):
    """Where the questions are shown and answered.

    ``ask`` returns only a text for which ``check`` returns ``None``; it may call ``check``
    as often as it likes (on every key press). Ctrl-C raises KeyboardInterrupt, end of input
    EOFError: the wizard then stops, and nothing is written.
    """

    def ask(self, prompt: Prompt, check: Check) -> str: ...

    def say(self, text: str) -> None: ...


def as_text(text: str) -> str:
    return text.strip()


def as_int(text: str) -> int | str:
    """A whole number, or the text itself so that the schema names the problem."""
    try:
        return int(text.strip())
    except ValueError:
        return text.strip()


def as_float(text: str) -> float | str:
    try:
        return float(text.strip())
    except ValueError:
        return text.strip()


def as_list(text: str) -> list[str]:
    """Comma-separated items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def as_argv(text: str) -> list[str]:
    """A command line, quoted as in a shell."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"not a command line: {exc}") from None


def as_bool(text: str) -> bool:
    answer = text.strip().lower()
    if answer in ("y", "yes", "true", "on", "1"):
        return True
    if answer in ("n", "no", "false", "off", "0"):
        return False
    raise ValueError("answer yes or no")


def shown(value: Any, parse: Parse = as_text) -> str:
    """A value as the text that, answered, gives it back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return shlex.join(value) if parse is as_argv else ", ".join(str(v) for v in value)
    return str(value)


def local_interfaces() -> list[str]:
    """This machine's network interfaces, offered as completions (nodes often match)."""
    try:
        return sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    except OSError:
        return []


def systemd_units() -> list[str]:
    units: set[str] = set()
    for base in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"):
        try:
            units.update(p.name for p in Path(base).glob("*.service") if "@" not in p.name)
        except OSError:
            continue
    return sorted(units)


class Questions:
    """The ways of asking, over a draft of ``cluster.toml``."""

    def __init__(
        self,
        asker: Asker,
        draft: dict[str, Any],
        *,
        new: bool,
        cannot_add_nodes: str | None = None,
    ) -> None:
        self.asker = asker
        self.draft = copy.deepcopy(draft)
        self.new = new
        self.cannot_add_nodes = cannot_add_nodes

    def field(
        self,
        loc: Loc,
        label: str,
        *,
        parse: Parse = as_text,
        prefill: bool = True,
        current: Any = None,
        text: str | None = None,
        hint: str = "",
        remove_if_empty: Loc | None = None,
        also: Iterable[Loc] = (),
        completions: Sequence[str] = (),
        complete_paths: bool = False,
    ) -> Any:
        """Ask for the value at ``loc`` and put it into the draft; returns the value.

        ``prefill``: the answer starts as the current value; else it starts empty and an
        empty answer keeps the current value. ``remove_if_empty``: an empty answer removes
        that key (an optional value left out).
        """
        if current is None:
            current = current_value(self.draft, loc)
        scopes = tuple(also)

        def value_of(answer: str) -> tuple[Loc, Any]:
            if not answer.strip():
                if remove_if_empty is not None:
                    return remove_if_empty, REMOVE
                if not prefill:
                    return loc, current
            return loc, parse(answer)

        def check(answer: str) -> str | None:
            try:
                where, value = value_of(answer)
            except ValueError as exc:
                return str(exc)
            return answer_error(self.draft, where, value, scopes)

        prompt = Prompt(
            label,
            default=(shown(current, parse) if text is None else text) if prefill else "",
            hint=hint or ("" if prefill else shown(current, parse)),
            help=describe(loc),
            completions=tuple(completions),
            complete_paths=complete_paths,
        )
        where, value = value_of(self.asker.ask(prompt, check))
        if value is REMOVE:
            set_at(self.draft, where, REMOVE)
            return None
        missing = object()
        present = get_at(self.draft, loc, missing)
        if present is missing:
            # An absent key answered with its default stays absent: nothing was changed.
            if not same_value(value, current_value(self.draft, loc)):
                set_at(self.draft, loc, value)
        elif not same_value(present, value):
            set_at(self.draft, loc, value)
        return value

    def choose(self, label: str, options: Sequence[str], default: str) -> str:
        def check(answer: str) -> str | None:
            choice = answer.strip() or default
            return None if choice in options else f"answer one of: {', '.join(options)}"

        prompt = Prompt(f"{label} [{'/'.join(options)}]", hint=default, completions=tuple(options))
        return self.asker.ask(prompt, check).strip() or default

    def yes(self, label: str, default: bool) -> bool:
        def check(answer: str) -> str | None:
            try:
                as_bool(answer or shown(default))
            except ValueError as exc:
                return str(exc)
            return None

        prompt = Prompt(f"{label} [{'Y/n' if default else 'y/N'}]", hint=shown(default))
        return as_bool(self.asker.ask(prompt, check) or shown(default))

    def flag(self, loc: Loc, label: str) -> bool:
        """A yes/no key: an empty answer keeps the current value."""
        current = bool(current_value(self.draft, loc))
        value = self.field(
            loc, f"{label} [{'Y/n' if current else 'y/N'}]", parse=as_bool, prefill=False
        )
        return bool(value)

    def review(
        self, key: Loc, what: str, summary: Callable[[dict[str, Any]], str]
    ) -> Iterator[int]:
        """Keep, edit or remove each existing entry of a list; yields the index to edit."""
        index = 0
        while index < len(entries := get_at(self.draft, key, [])):
            action = self.choose(f"{what} {summary(entries[index])}", KEEP_EDIT_REMOVE, "keep")
            if action == "remove":
                entries.pop(index)
                continue
            if action == "edit":
                yield index
            index += 1
