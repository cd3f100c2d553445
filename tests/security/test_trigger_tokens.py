"""Trigger tokens in browsers (issue 12, finding 4): a public trigger token sets only tags,
metadata, delay and ttl, so it cannot reach another caller's run through an idempotency or
debounce key, nor lift the limits a server sets; a refused or failed trigger does not use up a
single-use token. Against a scheduler in this process, SQLite and PostgreSQL."""

from __future__ import annotations

import json

import grpc
import pytest

import runplane
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import run_service_pb2_grpc
from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.app import Scheduler
from runplane_scheduler.keys import create_key
from tests.helpers.registration import register_in
from tests.helpers.worker import RawWorker

pytestmark = pytest.mark.timeout(90)


async def _trigger(
    s: Scheduler, key: str, request: rpb.TriggerRunRequest
) -> rpb.TriggerRunResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as channel:
        stub = run_service_pb2_grpc.RunServiceStub(channel)
        response: rpb.TriggerRunResponse = await stub.TriggerRun(
            request, metadata=(("authorization", f"Bearer {key}"),)
        )
        return response


FORBIDDEN: dict[str, rpb.TriggerOptions] = {
    "idempotency_key": rpb.TriggerOptions(idempotency_key="order-7"),
    "debounce": rpb.TriggerOptions(debounce=rpb.Debounce(key="order-7")),
    "parent_run_id": rpb.TriggerOptions(parent_run_id="run_01jd0000000000000000000000"),
    "priority": rpb.TriggerOptions(priority=3600),
    "max_attempts": rpb.TriggerOptions(max_attempts=250),
    "machine": rpb.TriggerOptions(machine="large-2x"),
    "queue": rpb.TriggerOptions(queue="vip"),
    "concurrency_key": rpb.TriggerOptions(concurrency_key="mine"),
    "max_duration": rpb.TriggerOptions(max_duration={"seconds": 3600}),
}


async def test_a_trigger_token_may_set_only_tags_metadata_delay_and_ttl(
    scheduler: Scheduler,
) -> None:
    key = await create_key(scheduler.engine_db, "dev")
    await register_in(scheduler, "dev", ("checkout",))
    server = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)
    token = await server.auth.create_trigger_public_token("checkout")
    for name, options in FORBIDDEN.items():
        request = rpb.TriggerRunRequest(task_id="checkout", payload="{}", options=options)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _trigger(scheduler, token, request)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, name
        assert f"options.{name}" in (refused.value.details() or ""), name
    # None of the refusals used the single-use token up; the allowed options work.
    allowed = rpb.TriggerOptions(tags=["cart:9"], metadata='{"step": 1}', ttl={"seconds": 600})
    allowed.delay.seconds = 60
    made = await _trigger(
        scheduler, token, rpb.TriggerRunRequest(task_id="checkout", payload="{}", options=allowed)
    )
    run = await server.runs.retrieve(made.run.id)
    assert run.tags == ["cart:9"] and run.metadata == {"step": 1} and run.status.value == "DELAYED"
    with pytest.raises(grpc.aio.AioRpcError) as used:
        await _trigger(scheduler, token, rpb.TriggerRunRequest(task_id="checkout", payload="{}"))
    assert used.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_trigger_token_cannot_take_over_a_servers_run(scheduler: Scheduler) -> None:
    """The attack: a browser passes the idempotency key a server used, to replace nothing but
    learn the server's payload and get a read token for its run."""
    key = await create_key(scheduler.engine_db, "dev")
    await register_in(scheduler, "dev", ("checkout",))
    server = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)
    mine = await server.tasks.trigger(
        "checkout", {"card": "4242"}, idempotency_key="order-7", tags=["server"]
    )
    token = await server.auth.create_trigger_public_token("checkout", multiple_use=True)
    browser = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=token)
    with pytest.raises(runplane.PermissionDeniedError, match="idempotency_key"):
        await browser.tasks.trigger("checkout", {"card": "x"}, idempotency_key="order-7")
    with pytest.raises(runplane.PermissionDeniedError, match="debounce"):
        await browser.tasks.trigger("checkout", {}, debounce={"key": "order-7", "delay": "5s"})
    run = await server.runs.retrieve(mine.id)
    assert run.payload == {"card": "4242"} and run.tags == ["server"]
    assert len([r async for r in server.runs.list()]) == 1


async def test_a_trigger_that_fails_validation_leaves_a_single_use_token_unused(
    scheduler: Scheduler,
) -> None:
    schema = {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}}
    worker_key = await create_key(scheduler.engine_db, "dev", kind="worker")
    key = await create_key(scheduler.engine_db, "dev")
    server = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=key)
    async with RawWorker(f"127.0.0.1:{scheduler.port}", worker_key) as worker:
        await worker.register(
            tasks=[wpb.TaskDefinition(id="typed-checkout", payload_schema=json.dumps(schema))]
        )
        token = await server.auth.create_trigger_public_token("typed-checkout")
        browser = runplane.Client(api_url=f"127.0.0.1:{scheduler.port}", secret_key=token)
        with pytest.raises(runplane.InvalidArgumentError, match="sku"):
            await browser.tasks.trigger("typed-checkout", {"quantity": 2})
        handle = await browser.tasks.trigger("typed-checkout", {"sku": "A-1"})
        assert (await server.runs.retrieve(handle.id)).payload == {"sku": "A-1"}
        with pytest.raises(runplane.UnauthenticatedError, match="used"):
            await browser.tasks.trigger("typed-checkout", {"sku": "A-2"})
