"""HeldStarts: what the executor tells the scheduler about an attempt's start, and when."""

from __future__ import annotations

import asyncio

from runplane.v1 import worker_service_pb2 as wpb
from runplane_executor.starts import HeldStarts


def _kinds(sent: list[wpb.ConnectRequest]) -> list[str]:
    return [str(m.WhichOneof("message")) for m in sent]


async def test_an_attempt_that_ends_within_the_hold_sends_nothing_before_its_result() -> None:
    sent: list[wpb.ConnectRequest] = []
    starts = HeldStarts(sent.append, hold=60)
    starts.assigned("a1")
    starts.started("a1")
    started_at = starts.ended("a1")
    assert sent == []
    assert started_at is not None and started_at > 0
    assert len(starts) == 0


async def test_a_running_attempt_reports_its_start_when_the_hold_ends() -> None:
    sent: list[wpb.ConnectRequest] = []
    starts = HeldStarts(sent.append, hold=0.01)
    starts.assigned("a1")
    starts.started("a1")
    while not sent:
        await asyncio.sleep(0.005)
    assert _kinds(sent) == ["started"]
    assert sent[0].started.attempt_id == "a1"
    assert sent[0].started.HasField("started_at")
    assert starts.ended("a1") is None  # its result carries no start of its own


async def test_an_attempt_not_yet_started_is_acknowledged_when_the_hold_ends() -> None:
    sent: list[wpb.ConnectRequest] = []
    starts = HeldStarts(sent.append, hold=0.01)
    starts.assigned("a1")
    while not sent:
        await asyncio.sleep(0.005)
    assert _kinds(sent) == ["ack"]
    starts.started("a1")  # later: reported at once
    assert _kinds(sent) == ["ack", "started"]


async def test_another_report_releases_the_held_start_first() -> None:
    sent: list[wpb.ConnectRequest] = []
    starts = HeldStarts(sent.append, hold=60)
    starts.assigned("a1")
    starts.started("a1")
    starts.release("a1")  # e.g. before a wait or a metadata update
    assert _kinds(sent) == ["started"]
    starts.release("a1")  # nothing more is held
    assert _kinds(sent) == ["started"]
    assert starts.ended("a1") is None


async def test_without_a_hold_the_acknowledgement_goes_at_once() -> None:
    sent: list[wpb.ConnectRequest] = []
    starts = HeldStarts(sent.append, hold=0)
    starts.assigned("a1")
    starts.started("a1")
    assert _kinds(sent) == ["ack", "started"]
