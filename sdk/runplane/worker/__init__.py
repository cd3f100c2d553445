"""The worker side of runplane: what runs task code.

``configure_logging`` and ``run_async`` set up a worker (or any runplane) process.
"""

from runplane._log import configure_logging, run_async

__all__ = ["configure_logging", "run_async"]
