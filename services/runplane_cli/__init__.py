"""The ``runplane`` command line: ``main`` parses the commands and runs the API ones (trigger,
runs, queues, schedules) with the SDK's client; ``keys`` manages keys and migrations straight
against the database; ``dev`` runs every service locally; :func:`fail` reports an error. Unlike
the SDK it may import the services, which is why it is a package of its own."""

from __future__ import annotations

import sys


def fail(message: str) -> int:
    """Say what went wrong on stderr; the exit code of a command that failed."""
    print(f"runplane: {message}", file=sys.stderr)
    return 2
