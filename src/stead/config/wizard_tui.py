"""The wizard on a terminal: prompt_toolkit prompts that check the answer while it is typed.

Each question is one prompt line. The answer starts as the current value (Enter accepts it,
Ctrl-U clears it); what an empty answer means is shown greyed while the line is empty. On
every key press the wizard's check runs, and its reason is shown under the line: Enter is
refused until the check passes. The schema's description of the key sits in the bottom
toolbar, and Tab completes node names, interfaces, units, kinds and paths.
"""

from __future__ import annotations

import re

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.styles import Style
from prompt_toolkit.validation import ValidationError, Validator

from stead.config.wizard_ask import Check, Prompt

_ITEM = re.compile(r"([^,\s]+)")  # one item of a comma-separated answer
_KEYS = "Enter accepts · Ctrl-U clears · Tab completes · Ctrl-C quits, writing nothing"
_STYLE = Style.from_dict(
    {
        "placeholder": "#888888 italic",
        "label": "bold",
        "section": "bold underline",
        "bottom-toolbar": "noreverse #aaaaaa",
        "validation-toolbar": "bg:#aa0000 #ffffff",
    }
)


class _CheckValidator(Validator):
    def __init__(self, check: Check) -> None:
        self.check = check

    def validate(self, document: Document) -> None:
        reason = self.check(document.text)
        if reason is not None:
            raise ValidationError(cursor_position=len(document.text), message=reason)


class TerminalAsker:
    """The :class:`~stead.config.wizard_flow.Asker` of a real terminal."""

    def __init__(self) -> None:
        self.session: PromptSession[str] = PromptSession(style=_STYLE)

    def ask(self, prompt: Prompt, check: Check) -> str:
        completer: Completer | None = None
        if prompt.completions:
            completer = WordCompleter(list(prompt.completions), pattern=_ITEM)
        elif prompt.complete_paths:
            completer = PathCompleter(expanduser=True, only_directories=True)
        toolbar = f"{prompt.help} · {_KEYS}" if prompt.help else _KEYS
        return self.session.prompt(
            FormattedText([("class:label", f"{prompt.label}: ")]),
            default=prompt.default,
            placeholder=FormattedText([("class:placeholder", prompt.hint)]),
            validator=_CheckValidator(check),
            validate_while_typing=True,
            completer=completer,
            complete_while_typing=bool(prompt.completions),
            bottom_toolbar=toolbar,
        )

    def say(self, text: str) -> None:
        print_formatted_text(FormattedText([("class:section", text)]), style=_STYLE)
