"""The services' NATS connections and the JetStream streams they make, alike for the scheduler's
relay and the realtime service, against one server or a cluster.

StreamSetupError   NATS refused to create a stream, or to bring it to runplane's configuration
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

log = logging.getLogger("runplane.jetstream")


class StreamSetupError(Exception):
    """NATS refused a stream as runplane configures it (for instance more replicas than the
    cluster has servers, or any above 1 on a server that is not in a cluster)."""


async def connect(servers: Sequence[str], name: str, **callbacks: Any) -> NATS:
    """A connection to any of ``servers`` (and the servers the cluster announces) that
    reconnects forever, to whichever server answers. ``name`` is how NATS's monitoring lists
    it (``/connz``); ``callbacks`` are nats-py's ``disconnected_cb``, ``error_cb``, ..."""
    return await nats.connect(
        servers=list(servers),
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        # A server that stops answering without closing the connection (its host gone, a
        # network split) is given up after about 3 pings, 6 s, not nats-py's default 6 minutes.
        ping_interval=2,
        max_outstanding_pings=2,
        **callbacks,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to ``config``: its replicas too, which NATS
    changes in place (the log says what changed). Raises StreamSetupError when NATS refuses,
    and nats-py's errors (or TimeoutError) when it does not answer."""
    try:
        await js.add_stream(config)
        return
    except ServiceUnavailableError:  # no meta leader yet: worth retrying as it is
        raise
    except APIError as error:  # it exists with another configuration, or NATS refuses it
        refused = error
    assert config.name is not None
    try:
        current = (await js.stream_info(config.name)).config
    except NotFoundError:
        raise StreamSetupError(_refusal(config, refused)) from refused
    changes = ", ".join(
        f"{f.name} {getattr(current, f.name)!r} -> {value!r}"
        for f in dataclasses.fields(config)
        if (value := getattr(config, f.name)) is not None and value != getattr(current, f.name)
    )
    try:
        updated = await js.update_stream(config)
    except APIError as error:
        raise StreamSetupError(
            f"stream {config.name} differs from runplane's configuration ({changes}) and NATS "
            f"refused to update it: {error.description} (err_code {error.err_code})"
        ) from error
    log.info("stream %s updated: %s", config.name, changes or "no visible change")
    # A server outside a cluster takes more replicas for an existing stream, and keeps one copy.
    replicas = config.num_replicas or 1
    if replicas > 1 and (updated.cluster is None or not updated.cluster.leader):
        log.warning(
            "stream %s is set to %d replicas (RUNPLANE_NATS_REPLICAS), but NATS is not a "
            "JetStream cluster: it keeps one copy",
            config.name,
            replicas,
        )


def _refusal(config: StreamConfig, error: APIError) -> str:
    replicas = config.num_replicas or 1
    hint = (
        f" (RUNPLANE_NATS_REPLICAS={replicas} needs a JetStream cluster of at least that many "
        "servers)"
        if replicas > 1
        else ""
    )
    return (
        f"NATS refused to create stream {config.name}: {error.description} "
        f"(err_code {error.err_code}){hint}"
    )
