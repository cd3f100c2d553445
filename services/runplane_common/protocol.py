"""The worker protocol's version (docs/worker-protocol.md): what an executor says it speaks in
``Register.protocol_version`` and the scheduler answers in ``Registered.protocol_version``.

Version 1 is the protocol as documented. A registration without a version (0) is version 1, so
workers written before the field existed keep working. A change that an older worker or
scheduler would misread gets a new version; additions it can ignore do not.

Version 2 adds batches: either side may send several of its messages as one
(``ReportBatch``, ``ResponseBatch``), in order. A version 1 worker never receives one.
"""

from __future__ import annotations

# The version this code's executor speaks.
WORKER_PROTOCOL_VERSION = 2
# The versions this code's scheduler speaks, oldest first.
SPOKEN_WORKER_PROTOCOL_VERSIONS = (1, 2)
# The first version with batches.
BATCHES = 2
# At most this many messages go in one batch.
MAX_BATCH = 256


def effective_version(requested: int) -> int:
    """A registration's protocol version, with 0 (unset) meaning 1."""
    return requested or 1
