"""The CLI's way to its agent: HTTP on the agent's Unix socket."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from stead.config.paths import DEFAULT_API_SOCKET, NODE_FILE, config_dir, resolve
from stead.errors import AgentUnavailable, SteadError, TimeoutExpired, UsageError

DEFAULT_SOCKET = Path(DEFAULT_API_SOCKET)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def find_socket(explicit: Path | None = None, directory: Path | None = None) -> Path:
    """Which agent to talk to: --socket, then the node configuration, then the lab's active."""
    if explicit:
        return explicit
    if directory or os.environ.get("STEAD_CONFIG_DIR"):
        return node_socket(config_dir(directory))
    if (config_dir() / NODE_FILE).is_file():
        return node_socket(config_dir())
    from stead.lab.state import find_lab

    lab = find_lab()
    if lab is not None:
        return lab.active_socket()
    return DEFAULT_SOCKET


def node_socket(directory: Path) -> Path:
    """The agent's socket as the node file names it. Only the node file is read (loading
    the configuration's models costs a client a third of a second); a node file that cannot
    be read or names no usable socket is loaded in full, for the error that says why."""
    try:
        with (directory / NODE_FILE).open("rb") as handle:
            value = tomllib.load(handle).get("api_socket", DEFAULT_API_SOCKET)
    except (OSError, tomllib.TOMLDecodeError):
        value = None
    if isinstance(value, str) and value:
        return resolve(directory, value)
    from stead.config.load import load

    return load(directory).api_socket


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 0
    ) -> Any:
        conn = _UnixConnection(str(self.socket_path), timeout or self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(
                f"{exc.strerror or exc}; is `stead agent` running?", where=self.socket_path
            ) from None
        except TimeoutError:
            raise TimeoutExpired(f"no answer from the agent within {conn.timeout} s") from None
        except http.client.HTTPException as exc:
            raise AgentUnavailable(
                f"not an agent's answer: {exc!r}", where=self.socket_path
            ) from None
        except OSError as exc:
            raise AgentUnavailable(str(exc), where=self.socket_path) from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            raise AgentUnavailable("the agent sent no JSON", where=self.socket_path) from None
        if response.status >= 400:
            message = decoded.get("error", response.reason) if isinstance(decoded, dict) else ""
            if response.status == 504:
                raise TimeoutExpired(message)
            if response.status == 400:
                raise UsageError(message)
            raise SteadError(message)
        return decoded
