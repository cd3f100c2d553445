"""Scraping a service's ``/metrics`` (and its probes) over real HTTP, and reading samples."""

from __future__ import annotations

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


async def get(base_url: str, path: str) -> tuple[int, str]:
    """GET ``base_url + path``: the status and the body as text."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(base_url + path) as response,
    ):
        return response.status, await response.text()


async def scrape(base_url: str) -> list[Metric]:
    """The families ``/metrics`` serves, parsed by prometheus_client's own parser."""
    status, text = await get(base_url, "/metrics")
    assert status == 200, text
    return list(text_string_to_metric_families(text))


def value(families: list[Metric], sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels`` (0 if none)."""
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def has(families: list[Metric], sample: str) -> bool:
    """Whether any sample is named ``sample``."""
    return any(s.name == sample for family in families for s in family.samples)
