"""A hand-made ``WorkerService.Connect`` stream: what any holder of a key can open, used to
play an executor (or an attacker posing as one) message by message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from runplane.v1 import worker_service_pb2 as wpb
from runplane.v1 import worker_service_pb2_grpc


class RawWorker:
    """One Connect stream to ``api_url`` with ``key``; ``register`` sends the first message and
    returns the scheduler's Registered (or raises its ``grpc.aio.AioRpcError``)."""

    def __init__(self, api_url: str, key: str) -> None:
        self.api_url = api_url
        self.key = key
        self._channel: grpc.aio.Channel | None = None
        self._out: asyncio.Queue[wpb.ConnectRequest | None] = asyncio.Queue()
        self.call: Any = None

    async def __aenter__(self) -> RawWorker:
        self._channel = grpc.aio.insecure_channel(self.api_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._out.put_nowait(None)
        if self.call is not None:
            self.call.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _requests(self) -> AsyncIterator[wpb.ConnectRequest]:
        while (message := await self._out.get()) is not None:
            yield message

    async def register(
        self,
        executor_id: str = "",
        session_token: str = "",
        tasks: Sequence[str | wpb.TaskDefinition] = (),
        running: Sequence[str] = (),
    ) -> wpb.Registered:
        assert self._channel is not None
        stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
        self.call = stub.Connect(
            self._requests(), metadata=(("authorization", f"Bearer {self.key}"),)
        )
        self.send(
            wpb.ConnectRequest(
                register=wpb.Register(
                    executor_id=executor_id,
                    session_token=session_token,
                    capacity=10,
                    running_attempt_ids=list(running),
                    manifest=wpb.Manifest(
                        tasks=[wpb.TaskDefinition(id=t) if isinstance(t, str) else t for t in tasks]
                    ),
                )
            )
        )
        response: wpb.ConnectResponse = await self.call.read()
        assert response.WhichOneof("message") == "registered", response
        return response.registered

    def send(self, message: wpb.ConnectRequest) -> None:
        self._out.put_nowait(message)

    async def read(self) -> wpb.ConnectResponse:
        response: wpb.ConnectResponse = await self.call.read()
        return response
