"""The Node.js package (clients/node) against a real cluster: its whole ``node --test`` suite (unit
tests, the worker against a scripted scheduler, and the client's integration tests: every
namespace, realtime subscriptions, streams and a worker in the test process), with this
cluster's addresses and keys."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.cluster import Cluster
from tests.helpers.node import node_env, node_test_files, run_node_tests, summary
from tests.helpers.reflection import list_services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLUSTER_TASKS = "tests.e2e.node_tasks"


async def test_the_node_suite_passes_against_a_live_cluster(cluster: Cluster) -> None:
    code, out = await run_node_tests(node_env(cluster), *node_test_files())
    assert code == 0, f"{out}\n{cluster.logs()}"
    # Nothing skipped: the integration tests found the cluster.
    counts = summary(out)
    assert counts["pass"] == counts["tests"] > 20 and counts["skipped"] == 0, out


async def test_every_process_lists_its_services_through_reflection(cluster: Cluster) -> None:
    for address, service in (
        (cluster.api_url, "runplane.v1.RunService"),
        (cluster.realtime_url, "runplane.v1.RealtimeService"),
        (cluster.executor_status_url, "runplane.v1.ExecutorService"),
    ):
        listing = await asyncio.to_thread(list_services, address)
        assert listing.get(service), (address, listing)
