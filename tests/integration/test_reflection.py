"""Every service can be discovered through server reflection (what `buf curl --list-methods` or
grpcurl use), with each of its methods, over reflection v1 and v1alpha."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_database import DescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2

from runplane.v1 import (
    auth_service_pb2,
    meta_service_pb2,
    realtime_service_pb2,
    run_service_pb2,
    worker_service_pb2,
)
from runplane_common.config import RealtimeSettings, SchedulerSettings
from runplane_realtime.server import serve
from runplane_scheduler.app import start_scheduler
from tests.helpers.reflection import list_services

BUF = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "buf"

REFLECTION_V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def _methods(module: Any, service: str) -> list[str]:
    return [m.name for m in module.DESCRIPTOR.services_by_name[service].methods]


def _ask_reflection_v1(
    address: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection v1 stream: a response per request. v1's messages are v1alpha's renamed,
    field for field, so v1alpha's classes encode them; the v1 method is what is asked."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            REFLECTION_V1_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=10))


def _files(response: reflection_pb2.ServerReflectionResponse) -> list[Any]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


async def test_every_service_lists_its_methods_through_reflection(
    migrated_database_url: str, nats_server: Any
) -> None:
    scheduler = await start_scheduler(
        SchedulerSettings(
            database_url=migrated_database_url, nats_url=nats_server.url, listen="127.0.0.1:0"
        )
    )
    realtime = await serve(
        RealtimeSettings(
            nats_url=nats_server.url,
            api_url=f"127.0.0.1:{scheduler.port}",
            listen="127.0.0.1:0",
        )
    )
    try:
        on_scheduler = await asyncio.to_thread(list_services, f"127.0.0.1:{scheduler.port}")
        on_realtime = await asyncio.to_thread(list_services, f"127.0.0.1:{realtime.port}")
    finally:
        await realtime.stop(grace=0)
        await scheduler.stop()

    assert on_scheduler["runplane.v1.RunService"] == _methods(run_service_pb2, "RunService")
    assert on_scheduler["runplane.v1.WorkerService"] == _methods(
        worker_service_pb2, "WorkerService"
    )
    assert on_scheduler["runplane.v1.MetaService"] == _methods(meta_service_pb2, "MetaService")
    assert on_scheduler["runplane.v1.AuthService"] == ["CreatePublicToken"]
    assert on_scheduler["runplane.v1.AuthService"] == _methods(auth_service_pb2, "AuthService")
    assert on_realtime["runplane.v1.RealtimeService"] == [
        "SubscribeToRun",
        "SubscribeToRunsWithTag",
        "SubscribeToBatch",
        "ReadStream",
        "AppendStream",
    ]
    assert on_realtime["runplane.v1.RealtimeService"] == _methods(
        realtime_service_pb2, "RealtimeService"
    )
    for listing in (on_scheduler, on_realtime):
        assert "grpc.health.v1.Health" in listing
        assert listing["grpc.reflection.v1alpha.ServerReflection"] == ["ServerReflectionInfo"]
        assert listing["grpc.reflection.v1.ServerReflection"] == ["ServerReflectionInfo"]


async def test_a_reflection_v1_client_lists_the_services_and_fetches_their_files(
    migrated_database_url: str, nats_server: Any
) -> None:
    if not BUF.exists():
        pytest.fail(f"{BUF} missing: run `make setup`")
    scheduler = await start_scheduler(
        SchedulerSettings(
            database_url=migrated_database_url, nats_url=nats_server.url, listen="127.0.0.1:0"
        )
    )
    address = f"127.0.0.1:{scheduler.port}"
    try:
        listed, run_service, reflection_v1 = await asyncio.to_thread(
            _ask_reflection_v1,
            address,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="runplane.v1.RunService"),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        )
        # buf curl is a second, independent v1 client (Go, built on grpc-proto's v1 messages);
        # with the protocol named it does not fall back to v1alpha.
        buf_curl = await asyncio.create_subprocess_exec(
            str(BUF),
            "curl",
            "--protocol=grpc",
            "--http2-prior-knowledge",
            "--reflect-protocol=grpc-v1",
            "--list-methods",
            f"http://{address}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(buf_curl.communicate(), 60)
        through_v1alpha = await asyncio.to_thread(list_services, address)
    finally:
        await scheduler.stop()

    names = {s.name for s in listed.list_services_response.service}
    assert names == set(through_v1alpha)
    assert {
        "runplane.v1.RunService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names

    # The file comes with everything it imports: a pool can be built from the answer alone.
    database = DescriptorDatabase()
    for file in _files(run_service):
        database.Add(file)
    fetched = DescriptorPool(database).FindServiceByName("runplane.v1.RunService")
    assert fetched.file.name == "runplane/v1/run_service.proto"
    assert [m.name for m in fetched.methods] == _methods(run_service_pb2, "RunService")

    (v1_file,) = _files(reflection_v1)
    assert (v1_file.name, v1_file.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    (method,) = v1_file.service[0].method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )

    assert buf_curl.returncode == 0, err.decode()
    assert [  # buf curl sorts what it lists
        line.removeprefix("runplane.v1.RunService/")
        for line in out.decode().splitlines()
        if line.startswith("runplane.v1.RunService/")
    ] == sorted(_methods(run_service_pb2, "RunService"))
