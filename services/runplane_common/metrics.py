"""Prometheus metrics and HTTP health probes, shared by every runplane service.

Each service instance keeps its series in a registry of its own (:func:`new_registry`), never
prometheus_client's global one: tests run several services in one process. Its HTTP port
answers three routes through :class:`Probes`:

    GET /metrics   the registry in the Prometheus text format
    GET /healthz   200 "ok": the process is alive and serving
    GET /readyz    200 "ready", or 503 with a one-line reason why not

Counts of events are kept in plain dictionaries where the events happen (:class:`Histograms`
for distributions: a prometheus_client metric costs microseconds per update, too much on the
scheduler's commit path) and state (queue depth, free slots, outbox lag) is read from the
service's memory; a :class:`Snapshot` collector turns both into families at scrape time. A
scrape neither writes to a database nor waits on I/O; a readiness check may do short reads,
bounded by :data:`READY_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# A readiness check: None when ready, else the reason it is not (one short line).
Readiness = Callable[[], Awaitable[str | None]]

# A readiness check that takes longer than this answers 503.
READY_TIMEOUT = 2.0
TEXT = "text/plain; charset=utf-8"
PATHS = ("/metrics", "/healthz", "/readyz")
# Buckets of latencies and durations in seconds: 5 ms to 1 h.
SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip


def new_registry() -> CollectorRegistry:
    """A registry for one service instance, with the process's CPU, memory and file series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


Labels = tuple[str, ...]


def gauge(
    name: str, documentation: str, labels: Iterable[str], values: Mapping[Labels, float]
) -> GaugeMetricFamily:
    """A gauge family with one sample per label-value tuple in ``values``."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in sorted(values.items()):
        family.add_metric(list(label_values), value)
    return family


def counter(
    name: str, documentation: str, labels: Iterable[str], values: Mapping[Labels, float]
) -> CounterMetricFamily:
    """A counter family (``name`` without ``_total``) read from counts kept elsewhere."""
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for label_values, value in sorted(values.items()):
        family.add_metric(list(label_values), value)
    return family


class Histograms:
    """Observations by label values, in fixed buckets (upper bounds, ``le``), exported as one
    histogram family. Cheap to update: a bisection and two additions."""

    def __init__(self, buckets: Iterable[float] = SECONDS_BUCKETS) -> None:
        self.bounds = sorted(buckets)
        if not self.bounds:
            raise ValueError("a histogram needs at least one bucket")
        # Per label values: a count per bucket (the last: above every bound), then the sum.
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, amount: float) -> None:
        found = self._data.get(labels)
        if found is None:
            found = self._data[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        found[0][bisect.bisect_left(self.bounds, amount)] += 1
        found[1][0] += amount

    def family(self, name: str, documentation: str, labels: Iterable[str]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=list(labels))
        les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        for label_values, (counts, total) in sorted(self._data.items()):
            cumulative, buckets = 0, []
            for le, count in zip(les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(label_values), buckets, sum_value=total[0])
        return family


class Snapshot(Collector):
    """Series computed at scrape time: ``read()`` returns the families, from memory only."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return list(self._read())

    def describe(self) -> Iterable[Metric]:
        # Nothing: registering must not read the service's state (it may not exist yet).
        return []


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes


class Probes:
    """The answers of ``/metrics``, ``/healthz`` and ``/readyz`` for one service instance."""

    def __init__(
        self, registry: CollectorRegistry, ready: Readiness, timeout: float = READY_TIMEOUT
    ) -> None:
        self.registry = registry
        self._ready = ready
        self._timeout = timeout

    def metrics(self) -> Answer:
        return Answer(200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry))

    async def readiness(self) -> Answer:
        try:
            reason = await asyncio.wait_for(self._ready(), self._timeout)
        except TimeoutError:
            reason = f"the readiness check took more than {self._timeout:g} s"
        except Exception as error:
            reason = f"the readiness check failed: {error}"
        if reason is None:
            return Answer(200, TEXT, b"ready\n")
        return Answer(503, TEXT, f"not ready: {reason}\n".encode())

    async def answer(self, method: str, path: str) -> Answer | None:
        """The answer for ``path``; None when it is not one of :data:`PATHS`."""
        if path not in PATHS:
            return None
        if method != "GET":
            return Answer(405, TEXT, b"use GET\n")
        if path == "/metrics":
            return self.metrics()
        if path == "/healthz":
            return Answer(200, TEXT, b"ok\n")
        return await self.readiness()

    def routes(self) -> list[web.RouteDef]:
        """The three routes for an aiohttp application."""

        async def handle(request: web.Request) -> web.StreamResponse:
            answer = await self.answer(request.method, request.path)
            assert answer is not None  # routed to PATHS only
            return web.Response(
                status=answer.status,
                body=answer.body,
                headers={"Content-Type": answer.content_type},
            )

        return [web.get(path, handle) for path in PATHS]


class ProbeServer:
    """A small aiohttp server with only the probe routes, for a service without an HTTP port
    of its own (the executor)."""

    def __init__(self, probes: Probes) -> None:
        self.app = web.Application()
        self.app.add_routes(probes.routes())
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``listen`` (``host:port``; port 0 picks one) and return the port."""
        host, port = listen.rsplit(":", 1)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, int(port), ssl_context=ssl_context)
        await site.start()
        bound: int = self._runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            with contextlib.suppress(Exception):
                await runner.cleanup()
