"""Reading what the scheduler published: the RunEvents in JetStream's run-events stream."""

from __future__ import annotations

import nats

from runplane.v1 import events_pb2
from runplane_common import subjects


async def stream_events(nats_url: str) -> list[events_pb2.RunEvent]:
    """Every RunEvent in the run-events stream so far, in order, read by an ordered consumer."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.RUN_EVENTS_STREAM)
        total = info.state.messages
        sub = await js.subscribe(f"{subjects.RUN_EVENTS_PREFIX}.>", ordered_consumer=True)
        events = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=5)
            events.append(events_pb2.RunEvent.FromString(msg.data))
        await sub.unsubscribe()
        return events
    finally:
        await nc.close()
