"""What every service process does in its ``main``: logging to stderr at a level, and the event
loop that runs the service (uvloop when it is available)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_LOG_LEVEL = "INFO"


def configure_logging(level: str = DEFAULT_LOG_LEVEL) -> None:
    """Log records at ``level`` (a logging level name, any case) and above to stderr; NATS
    client records only from WARNING, unless ``level`` is DEBUG."""
    level = level.upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is available."""
    try:
        # Imported here: the loop is optional, and only a process's main needs it.
        import uvloop

        return uvloop.run(coro)  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.run(coro)
