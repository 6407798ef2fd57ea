"""``stead agent``: run this node's daemon in the foreground (systemd runs it so)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from stead.cli.options import ConfigDirOption
from stead.config.load import load


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "at": self.formatTime(record),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def agent(config: ConfigDirOption = None) -> None:
    """Run the Stead agent of this node."""
    loaded = load(config)
    handler = logging.StreamHandler(sys.stderr)
    if loaded.node.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    from stead.agent.daemon import run_agent
    from stead.memtune import raise_open_files, tune_gc, tune_malloc

    tune_malloc()
    raise_open_files()
    tune_gc()  # last: what the imports above made is frozen
    asyncio.run(run_agent(loaded))
