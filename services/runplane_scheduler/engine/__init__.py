"""The run engine: a thin front (:class:`RunEngine`, in :mod:`.front`) over systems that share
one :class:`~.resources.EngineResources` and get their siblings through their constructors.

- :mod:`.timers` — durable timers and the loop that fires them, by :class:`~.timers.TimerKind`
- :mod:`.attempts` — leases, an attempt's start and result, retries, lapsed leases
- :mod:`.triggering` — new runs, batches, idempotency, debounce, delays and TTLs
- :mod:`.waitpoints` — waits (durations, tokens, child runs), suspend and resume
- :mod:`.dequeue` — the dispatch loop: dequeue a run, or resume a waiting one
- :mod:`.executors` — registration, sessions, heartbeats, holders, queue settings
- :mod:`.runs` — cancel, replay, reschedule, metadata, tags, logs
- :mod:`.clock` — the injected clock (:class:`~.clock.ManualClock` for tests)

Systems never import the front.
"""

from runplane_scheduler.engine.front import RunEngine

__all__ = ["RunEngine"]
