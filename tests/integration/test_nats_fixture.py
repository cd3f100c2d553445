"""The nats_server fixture restarts on the same port and keeps JetStream data across restarts."""

from __future__ import annotations

import nats
import pytest
from nats.js.api import StorageType

from tests.helpers.nats import NatsServer

STREAM = "FIXTURE"


async def _publish(server: NatsServer, count: int) -> None:
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name=STREAM, subjects=["fixture.>"], storage=StorageType.FILE)
        for n in range(count):
            ack = await js.publish(f"fixture.{n}", f"message {n}".encode())
            assert ack.seq == n + 1
    finally:
        await client.close()


async def _read_back(server: NatsServer) -> list[bytes]:
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        info = await js.stream_info(STREAM)
        assert info.state.messages is not None
        return [
            (await js.get_msg(STREAM, seq)).data or b"" for seq in range(1, info.state.messages + 1)
        ]
    finally:
        await client.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_keeps_jetstream_messages(nats_server: NatsServer, how: str) -> None:
    url = nats_server.url
    await _publish(nats_server, 3)

    if how == "stop":
        await nats_server.stop()
    else:
        nats_server.kill()
    assert not nats_server.running
    await nats_server.start()

    assert nats_server.url == url
    assert await _read_back(nats_server) == [b"message 0", b"message 1", b"message 2"]


async def test_session_server_serves_jetstream(nats_server_session: NatsServer) -> None:
    client = await nats.connect(nats_server_session.url)
    try:
        js = client.jetstream()
        # The server is shared: a stream name of this test's own.
        await js.add_stream(name="SESSION_FIXTURE", subjects=["session-fixture"])
        ack = await js.publish("session-fixture", b"hello")
        assert (await js.get_msg("SESSION_FIXTURE", ack.seq)).data == b"hello"
    finally:
        await client.close()
