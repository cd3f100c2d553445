"""The realtime service's Prometheus series, read from its memory at scrape time (see
:mod:`runplane_common.metrics` for the routes):

    runplane_realtime_subscribers{kind}               subscribers open now (run, tag, batch, stream)
    runplane_realtime_subscriptions_total{kind}       subscribers opened
    runplane_realtime_subscribers_dropped_total{kind} subscribers cut off (fell behind, expired)
    runplane_realtime_nats_connected                  1 while the NATS connection is up
    runplane_nats_errors_total{operation}             failed connects and lost connections

SSE and gRPC subscribers count alike: both are one feed of the shared core.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from runplane_common.metrics import Snapshot, counter, gauge
from runplane_realtime.core import Realtime

KINDS = ("run", "tag", "batch", "stream")


class RealtimeMetrics:
    """One realtime service's series in ``registry``."""

    def __init__(self, registry: CollectorRegistry, realtime: Realtime) -> None:
        self._realtime = realtime
        registry.register(Snapshot(self._state))

    def _state(self) -> Iterator[Metric]:
        rt = self._realtime
        yield gauge(
            "runplane_realtime_subscribers",
            "Subscribers open now, by kind (SSE and gRPC alike).",
            ["kind"],
            {(k,): rt.subscribers[k] for k in KINDS},
        )
        yield counter(
            "runplane_realtime_subscriptions",
            "Subscribers opened, by kind.",
            ["kind"],
            {(k,): rt.opened[k] for k in KINDS},
        )
        yield counter(
            "runplane_realtime_subscribers_dropped",
            "Subscribers cut off because they fell behind or their token expired, by kind.",
            ["kind"],
            {(k,): rt.dropped[k] for k in KINDS},
        )
        yield gauge(
            "runplane_realtime_nats_connected",
            "1 while the NATS connection is up.",
            [],
            {(): 1.0 if rt.link.connected else 0.0},
        )
        yield counter(
            "runplane_nats_errors",
            "NATS failures: failed connects, lost connections, errors NATS reported.",
            ["operation"],
            {("connection",): rt.link.errors},
        )

    async def not_ready(self) -> str | None:
        """Why the service cannot serve subscribers now (None: it can): NATS, the scheduler."""
        rt = self._realtime
        if not rt.link.connected:
            return f"not connected to NATS at {rt.link.url}"
        return await rt.scheduler.not_serving()
