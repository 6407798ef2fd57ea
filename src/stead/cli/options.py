"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigDirOption = Annotated[
    Path | None,
    typer.Option(
        "--config-dir",
        "-c",
        help="Configuration directory (default: $STEAD_CONFIG_DIR or /etc/stead).",
    ),
]
SocketOption = Annotated[
    Path | None,
    typer.Option("--socket", help="The agent's API socket (default: from the configuration)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
