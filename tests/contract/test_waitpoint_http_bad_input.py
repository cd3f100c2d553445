"""The scheduler's HTTP endpoint that completes a wait token by URL, under bad input: random
requests, malformed HTTP and oversized bodies get a clear HTTP error and change no row.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import waitpoint_service_pb2 as wspb
from tests.helpers.contract import (
    FUZZ,
    LIMITS,
    WAIT,
)
from tests.helpers.inputs import (
    json_ok,
    json_texts,
    texts,
    token_refs,
)
from tests.helpers.worlds import (
    ScheduleWorld,
    token_rows,
)

pytestmark = pytest.mark.timeout(600)


# -- the token completion endpoint (HTTP) ----------------------------------------------------------


def _http(w: ScheduleWorld, raw: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``raw`` to the scheduler's HTTP port; the status and JSON body of its answer."""
    assert w.stack.scheduler is not None
    port = int(w.stack.scheduler.http_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), f"not an HTTP answer: {answer[:200]!r}"
    return int(status_line.split()[1]), json.loads(body)


def _post(
    path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def _completion_path(token_id: str, secret: str) -> str:
    return f"/api/v1/waitpoints/tokens/{token_id}/complete?secret={quote(secret)}"


@given(
    ref=token_refs,
    secret=st.one_of(st.just("@right"), texts, st.just("")),
    body=st.one_of(
        json_texts.map(str.encode),
        st.binary(max_size=300),
        st.sampled_from([b"", b"{", b"\xff\xfe", b"1e400", b"[" * 2000, b"9" * 400]),
    ),
    method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "post"]),
)
@FUZZ
def test_token_completion_by_url_with_random_requests_answers_properly(
    schedule_world: ScheduleWorld, ref: str, secret: str, body: bytes, method: str
) -> None:
    w = schedule_world
    token_id = w.resolve(ref)
    if secret == "@right":
        secret = w.secrets.get(token_id, "nope")
    path = _completion_path(token_id, secret)
    before = token_rows(w)
    status, answer = _http(w, _post(path, body, method=method))
    what = f"{method} {path[:120]} with {body[:60]!r}"
    assert status in (200, 400, 404, 405, 413), f"{what}: {status} {answer}"
    if status != 200:
        assert isinstance(answer.get("error"), str) and len(answer["error"]) >= 5, answer
        assert token_rows(w) == before, f"{what} refused, yet rows changed"
    right = w.secrets.get(token_id) == secret and secret
    if (
        method == "POST"
        and right
        and json_ok(body.decode("utf-8", "replace"), LIMITS.payload_bytes)
        and _utf8(body)
    ):
        assert status == 200, f"{what}: {status} {answer}"
        assert answer["id"] == token_id and answer["status"] == "COMPLETED"
    elif status == 200:
        assert method == "POST" and right, f"{what} was served: {answer}"


def _utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


COMPLETE = b"POST /api/v1/waitpoints/tokens/waitpoint_x/complete HTTP/1.1\r\n"
RAW_REQUESTS = [
    b"",
    b"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"POST\r\n\r\n",
    b"POST /x\r\n\r\n",
    b"\xff\xfe\xfd /\xff HTTP/1.1\r\n\r\n",
    COMPLETE + b"Content-Length: -5\r\n\r\n",
    COMPLETE + b"Content-Length: abc\r\n\r\n",
    COMPLETE + b"Content-Length: \xb2\r\n\r\n",
    COMPLETE + b"Content-Length: 5_0\r\n\r\n",
    COMPLETE + b"Content-Length: 99999999999\r\n\r\n",
    COMPLETE + b"Content-Length: 10\r\n\r\n{}",
    b"POST /api/v1/waitpoints/tokens/waitpoint_x/complete?secret=%ZZ HTTP/1.1\r\n\r\n",
    b"POST /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 10_000 + b"\r\n",
]


def test_malformed_http_requests_get_a_clear_http_error(schedule_world: ScheduleWorld) -> None:
    w = schedule_world
    before = token_rows(w)
    for raw in RAW_REQUESTS:
        status, answer = _http(w, raw)
        assert status in (400, 404, 405, 413), f"{raw[:100]!r}: {status} {answer}"
        assert isinstance(answer.get("error"), str) and len(answer["error"]) >= 5, answer
    assert token_rows(w) == before


def test_an_oversized_completion_body_is_refused_by_its_size(schedule_world: ScheduleWorld) -> None:
    w = schedule_world
    token_id = w.tokens["dev"]
    path = _completion_path(token_id, w.secrets[token_id])
    before = token_rows(w)
    # The declared length alone is refused, before any of the body is read.
    head = _post(path, b"", {"Content-Length": str(3 * 1024 * 1024 + 1)})
    status, answer = _http(w, head)
    assert status in (400, 413) and "bytes" in answer["error"], (status, answer)
    assert token_rows(w) == before
    status, answer = _http(w, _post(path, b'{"approved": true}'))
    assert status == 200, answer
    got = w.ok(
        WAIT + "GetToken", wspb.GetTokenRequest(token_id=token_id), "dev", wspb.GetTokenResponse
    )
    assert got.token.status == wspb.WAITPOINT_STATUS_COMPLETED
    assert json.loads(got.token.output) == {"approved": True}
