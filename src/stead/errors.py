"""Every error Stead raises on purpose.

Each class's docstring is its message template (filled with ``str.format`` from the keyword
arguments given when raising), and each class has its own process exit code, so that scripts
can tell failures apart. ``retryable`` says whether trying the same thing again may succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class SteadError(Exception):
    """Error: {message}"""

    exit_code: ClassVar[int] = 2
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", **kwargs: Any) -> None:
        self.kwargs = dict(kwargs, message=message)
        doc = (type(self).__doc__ or "{message}").strip().splitlines()[0]
        try:
            text = doc.format(**self.kwargs)
        except (KeyError, IndexError):
            text = message or doc
        super().__init__(text)


class ConfigError(SteadError):
    """Configuration error in {file}: {message}"""

    exit_code = 10

    def __init__(self, message: str, *, file: str = "<config>", problems: list[str] | None = None):
        self.file = file
        self.problems = problems or [f"{file}: {message}"]
        super().__init__(message, file=file)


class UsageError(SteadError):
    """Usage error: {message}"""

    exit_code = 11


class NotFound(UsageError):
    """Not found: {message}"""

    exit_code = 12


class ProtocolError(SteadError):
    """Protocol error from peer: {message}"""

    exit_code = 20


class ChannelError(SteadError):
    """Channel error: {message}"""

    exit_code = 21
    retryable = True


class AuthenticationError(ChannelError):
    """Peer refused: {message}"""

    exit_code = 22
    retryable = False


class JournalError(SteadError):
    """Journal error: {message}"""

    exit_code = 30


class CorruptRecord(JournalError):
    """Corrupt record in {file} at offset {offset}: {message}"""

    exit_code = 31


class OutOfSync(SteadError):
    """Out of sync: {message}"""

    exit_code = 32
    retryable = True


class UnsafePath(SteadError):
    """Refused path {path!r}: {message}"""

    exit_code = 40

    def __init__(self, message: str, *, path: str, symlink: bool = False) -> None:
        self.path = path
        self.symlink = symlink  # refused for a symlink on the way (not for its spelling)
        super().__init__(message, path=path)


class ApplyError(SteadError):
    """Could not apply entry {seq}: {message}"""

    exit_code = 41
    retryable = True


class AgentUnavailable(SteadError):
    """Agent not reachable at {where}: {message}"""

    exit_code = 50
    retryable = True


class TimeoutExpired(SteadError):
    """Timed out: {message}"""

    exit_code = 51
    retryable = True


class LabError(SteadError):
    """Lab error: {message}"""

    exit_code = 60


class IdentityError(SteadError):
    """Identity error: {message}"""

    exit_code = 70


class ServiceError(SteadError):
    """Service {service}: {message}"""

    exit_code = 80
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        service: str,
        command: Sequence[str] = (),
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        self.service = service
        self.command = tuple(command)
        self.returncode = returncode
        self.output = output
        super().__init__(message, service=service)


class PatchError(SteadError):
    """Patch stopped at {node}: {step}: {message}"""

    exit_code = 90

    def __init__(self, message: str, *, node: str, step: str) -> None:
        self.node = node
        self.step = step
        super().__init__(message, node=node, step=step)


class RecloneError(SteadError):
    """Reclone error: {message}"""

    exit_code = 100


def all_errors() -> list[type[SteadError]]:
    """Every error class, root first, for the generated error table in the docs."""
    found: list[type[SteadError]] = []
    pending: list[type[SteadError]] = [SteadError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


class FrameTooLarge(ProtocolError):
    """Frame too large: {message}"""

    exit_code = 23
