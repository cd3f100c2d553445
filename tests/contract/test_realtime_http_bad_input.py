"""The realtime service's HTTP endpoints under bad input: the SSE subscriptions and trigger by
URL, with random paths, queries, headers and bodies, and bodies over the size limits. Every
answer is an HTTP status the API documents, a refusal explains itself (naming the field for a
400) and writes nothing.
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import quote, urlencode

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import realtime_service_pb2 as rtpb
from runplane_common.grpcserver import MAX_MESSAGE_BYTES
from tests.helpers.contract import (
    DEADLINE,
    FUZZ,
    KEYS,
    LIMITS,
    RT,
    unary,
)
from tests.helpers.inputs import (
    RUN_ID,
    auths,
    json_texts,
    task_id_ok,
    texts,
)
from tests.helpers.worlds import (
    RealtimeWorld,
)

pytestmark = pytest.mark.timeout(600)


# -- the HTTP endpoints ----------------------------------------------------------------------------


def _http(
    w: RealtimeWorld, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and (for a refusal) the body; an SSE stream is left after its headers."""
    realtime = w.stack.realtime
    assert realtime is not None
    connection = http.client.HTTPConnection("127.0.0.1", realtime.http_port, timeout=DEADLINE)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        got = dict(response.getheaders())
        data = (
            b""
            if response.status == 200 and "event-stream" in got.get("Content-Type", "")
            else response.read()
        )
        return response.status, got, data
    finally:
        connection.close()


def _error_of(status: int, data: bytes, what: str) -> dict[str, Any]:
    body = json.loads(data)
    error: dict[str, Any] = body["error"]
    assert len(error["message"]) >= 5, f"{what}: {status} {body}"
    return error


HTTP_OK = {200, 400, 401, 403, 404, 405, 409, 413}


def _header_safe(value: str) -> str:
    return value.encode("latin-1", "replace").decode("latin-1").replace("\r", "").replace("\n", "")


@given(
    kind=st.sampled_from(["run", "tag", "batch", "stream"]),
    ref=st.one_of(st.sampled_from(["@dev", "@prod", "@dev-canceled", "@dev-batch"]), texts),
    query=st.dictionaries(
        st.sampled_from(
            [
                "after_version",
                "resume_cursor",
                "after_index",
                "created_after",
                "tag",
                "keep_open",
                "token",
            ]
        ),
        st.one_of(st.integers(-5, 10).map(str), st.just("9" * 30), st.just("x"), texts),
        max_size=3,
    ),
    last_event_id=st.one_of(st.none(), st.sampled_from(["1", "\u00b2", "-1", "9" * 30, "x"])),
    who=auths,
)
@FUZZ
def test_sse_endpoints_with_random_requests_answer_properly(
    realtime_world: RealtimeWorld,
    kind: str,
    ref: str,
    query: dict[str, str],
    last_event_id: str | None,
    who: str,
) -> None:
    w = realtime_world
    value = quote(w.resolve(ref), safe="")
    path = {
        "run": f"/realtime/v1/runs/{value}",
        "tag": "/realtime/v1/runs",
        "batch": f"/realtime/v1/batches/{value}",
        "stream": f"/realtime/v1/streams/{quote(w.ids['dev-canceled'])}/{value}",
    }[kind]
    if kind == "tag":
        query = {"tag": w.resolve(ref), **query}
    target = path + ("?" + urlencode(query) if query else "")
    headers = {}
    if who != "none":
        headers["Authorization"] = "Bearer " + _header_safe(w.stack.keys.get(who, who))
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    what = f"GET {target[:200]} as {who!r} (Last-Event-ID {last_event_id!r})"
    status, _, data = _http(w, "GET", target, headers)
    assert status in HTTP_OK, f"{what}: {status} {data[:300]!r}"
    if status == 200:
        return
    if status == 404 and not data.startswith(b"{"):
        return  # no such route (aiohttp's own answer)
    error = _error_of(status, data, what)
    if status == 400:
        assert error.get("field"), f"{what}: a 400 that names no field: {error}"


TRIGGER_BODIES = st.one_of(
    st.builds(
        lambda payload, options: json.dumps({"payload": payload, "options": options}).encode(),
        st.one_of(st.none(), json_texts.map(json.loads)),
        st.one_of(
            st.just({}),
            st.dictionaries(
                st.sampled_from(
                    [
                        "tags",
                        "delay",
                        "ttl",
                        "priority",
                        "maxAttempts",
                        "metadata",
                        "queue",
                        "nope",
                        "idempotencyKey",
                        "debounce",
                    ]
                ),
                st.one_of(
                    st.integers(-(2**40), 2**40),
                    st.text(max_size=20),
                    st.lists(st.text(max_size=5), max_size=3),
                    st.none(),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                ),
                max_size=3,
            ),
            st.sampled_from(["x", 1, [], None]),
        ),
    ),
    st.binary(max_size=200),
    st.sampled_from([b"", b"[]", b"null", b'{"options": 5}', b"{", b'{"payload": 1e400}']),
)


@given(task=st.one_of(task_id_ok, texts), body=TRIGGER_BODIES, who=auths)
@FUZZ
def test_trigger_by_url_with_random_requests_answers_properly(
    realtime_world: RealtimeWorld, task: str, body: bytes, who: str
) -> None:
    w = realtime_world
    headers = {"Content-Type": "application/json"}
    if who != "none":
        headers["Authorization"] = "Bearer " + _header_safe(w.stack.keys.get(who, who))
    target = f"/api/v1/tasks/{quote(task, safe='')}/trigger"
    what = f"POST {target} {body[:200]!r} as {who!r}"
    before = _rows(w)
    status, _, data = _http(w, "POST", target, headers, body)
    assert status in HTTP_OK, f"{what}: {status} {data[:300]!r}"
    if status == 200:
        answer = json.loads(data)
        assert RUN_ID.fullmatch(answer["id"]) and answer["run"]["task_id"] == task
        assert who in KEYS
        return
    assert _rows(w) == before, f"{what} refused, yet rows changed"
    if status == 404 and not data.startswith(b"{"):
        return  # a task id that is no path
    error = _error_of(status, data, what)
    if who not in KEYS:  # the body's shape is checked first, then the key
        assert status in (400, 401), f"{what}: {status} {error}"
    if status == 400:
        assert error.get("field"), f"{what}: a 400 that names no field: {error}"


def _rows(w: RealtimeWorld) -> dict[str, int]:
    """Row counts a trigger changes (the relay drains the outbox meanwhile: not counted)."""
    state = w.stack.state()
    return {k: state[k] for k in ("runs", "run_tags", "attempts", "versions")}


def test_oversized_requests_are_refused_by_their_size(realtime_world: RealtimeWorld) -> None:
    w = realtime_world
    before, chunks = _rows(w), w.chunks_stored()
    big = json.dumps("x" * MAX_MESSAGE_BYTES)
    request = rtpb.AppendStreamRequest(run_id=w.ids["dev"], stream_id="big", chunks=[big])
    outcome = unary(w.stack.realtime_channel(), RT + "AppendStream", request, w.stack.auth("dev"))
    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome)
    # HTTP: a trigger body over the payload limit and 1 MiB for options, whatever its content.
    headers = {"Authorization": f"Bearer {w.stack.keys['dev']}"}
    over = LIMITS.payload_bytes + (1 << 20) + 1
    for body in (json.dumps({"payload": "x" * over}).encode(), b"\xff" * over):
        status, _, _ = _http(w, "POST", "/api/v1/tasks/t/trigger", headers, body)
        assert status == 413, status
    assert (_rows(w), w.chunks_stored()) == (before, chunks)
    # A payload the API takes is taken by URL too (it is over aiohttp's default of 1 MiB).
    legal = json.dumps({"payload": "x" * (LIMITS.payload_bytes - 100)}).encode()
    status, _, data = _http(w, "POST", "/api/v1/tasks/t/trigger", headers, legal)
    assert status == 200, (status, data[:300])
