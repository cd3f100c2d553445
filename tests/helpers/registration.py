"""Tasks made known to an environment without an executor to run them: an executor registers
them and goes away. A trigger of a task no version registered is refused (INVALID_ARGUMENT), so
tests whose runs are meant to wait (in PENDING_VERSION) register their tasks first."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from runplane.tls import TlsSettings, open_channel
from runplane.v1 import worker_service_pb2 as wpb
from runplane.v1 import worker_service_pb2_grpc as wpb_grpc
from runplane_scheduler.app import Scheduler
from runplane_scheduler.keys import create_key

# The task ids the tests trigger with nobody to run them.
UNDEPLOYED = ("not-deployed", "nobody-runs-this", "t", "a", "b")


async def register_tasks(
    api_url: str, key: str, task_ids: tuple[str, ...] = UNDEPLOYED, tls: TlsSettings | None = None
) -> None:
    """An executor with ``key`` (a worker key, or a secret key made to execute) registers
    ``task_ids`` at the scheduler at ``api_url``, then disconnects: the tasks stay known."""
    manifest = wpb.Manifest(tasks=[wpb.TaskDefinition(id=t) for t in task_ids])

    async def requests() -> AsyncIterator[wpb.ConnectRequest]:
        yield wpb.ConnectRequest(register=wpb.Register(manifest=manifest, capacity=1))

    channel = open_channel(api_url, tls or TlsSettings())
    try:
        call = wpb_grpc.WorkerServiceStub(channel).Connect(
            requests(), metadata=(("authorization", f"Bearer {key}"),), timeout=30
        )
        async for response in call:
            assert response.WhichOneof("message") == "registered", response
            call.cancel()
            break
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.CANCELLED:
            raise
    finally:
        await channel.close()


async def register_in(
    scheduler: Scheduler,
    env: str = "dev",
    task_ids: tuple[str, ...] = UNDEPLOYED,
    tls: TlsSettings | None = None,
) -> None:
    """``register_tasks`` at an in-process ``scheduler`` (reached over ``tls``, a client's
    settings), with a new worker key of ``env``."""
    key = await create_key(scheduler.engine_db, env, kind="worker")
    await register_tasks(f"127.0.0.1:{scheduler.port}", key, task_ids, tls)
