"""What a request may carry: hypothesis strategies for any value and for valid ones, and the
server's documented reading of a value (the id shapes, durations, timestamps, JSON, page tokens).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st

from runplane.v1 import run_service_pb2 as rpb
from tests.helpers.contract import LIMITS

# The documented shapes, matched over the whole string (a trailing newline is no id).
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
RUN_ID = re.compile(r"run_[0-9a-z]{1,36}")
BATCH_ID = re.compile(r"batch_[0-9a-z]{1,36}")
TEN_YEARS_MS = 3650 * 86_400_000
MIN_TS, MAX_TS = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31
ID_CHARS = "0123456789abcdefghjkmnpqrstvwxyz"

# -- strategies ------------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "run_\x00",
    "\n",
    "\x01\x7f",
    "run_",
    "run_" + "0" * 26,
    "run_" + "z" * 36,
    "run_" + "z" * 37,
    "run_é",
    "null",
    "{}",
    "[]",
    "'; DROP TABLE runs; --",
    "%s%s%n",
    "../../etc/passwd",
    "\u202egnp.exe",
    "😀" * 3,
    "\ufeff",
    "a" * 129,
    "é" * 200,
]
texts = st.one_of(st.text(st.characters(codec="utf-8"), max_size=200), st.sampled_from(NASTY))
task_id_ok = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:/-]{0,40}\Z")
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
json_texts = json_values.map(lambda v: json.dumps(v, ensure_ascii=False))
# Any key: the two real ones, none at all, or printable text that is no key.
auths = st.one_of(
    st.sampled_from(["dev", "dev", "dev", "prod", "none"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60),
)


@st.composite
def trigger_requests(draw: st.DrawFn) -> rpb.TriggerRunRequest:
    """Any TriggerRunRequest: fields valid or not, independently."""
    options = rpb.TriggerOptions(
        queue=draw(st.one_of(st.just(""), task_id_ok, texts)),
        tags=draw(st.lists(st.one_of(task_id_ok, texts), max_size=12)),
        metadata=draw(st.one_of(st.just(""), json_texts, texts)),
        max_attempts=draw(st.one_of(st.integers(0, 300), int32)),
        idempotency_key=draw(st.one_of(st.just(""), texts, st.just("k" * 2049))),
        concurrency_key=draw(st.one_of(st.just(""), texts, st.just("c" * 257))),
        priority=draw(st.one_of(st.integers(0, 1000), int32)),
    )
    request = rpb.TriggerRunRequest(
        task_id=draw(st.one_of(task_id_ok, texts)),
        payload=draw(st.one_of(st.just(""), json_texts, texts)),
    )
    if draw(st.booleans()):
        request.options.CopyFrom(options)
    return request


@st.composite
def valid_trigger_requests(draw: st.DrawFn) -> rpb.TriggerRunRequest:
    """A TriggerRunRequest the API documents as valid."""
    return rpb.TriggerRunRequest(
        # A task some executor has registered (Stack.start registers "t").
        task_id="t",
        payload=draw(st.one_of(st.just(""), json_texts)),
        options=rpb.TriggerOptions(
            # A named queue must be defined by a registered task; none is here.
            queue="",
            tags=draw(st.lists(task_id_ok, max_size=LIMITS.tags)),
            metadata=draw(
                st.one_of(
                    st.just(""),
                    st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(json.dumps),
                )
            ),
            max_attempts=draw(st.integers(0, 250)),
            idempotency_key=draw(st.one_of(st.just(""), task_id_ok)),
            concurrency_key=draw(st.one_of(st.just(""), task_id_ok)),
            priority=draw(st.integers(0, 10_000)),
        ),
    )


run_ids = st.one_of(
    texts,
    st.sampled_from(["@dev", "@dev-canceled", "@prod"]),
    st.text("0123456789abcdefghjkmnpqrstvwxyz", min_size=26, max_size=26).map(lambda s: "run_" + s),
)


def resolve_run(value: str, ids: dict[str, str]) -> str:
    return ids[value[1:]] if value.startswith("@") and value[1:] in ids else value


# -- ids, durations, timestamps, JSON and page tokens ----------------------------------------------


def duration_ms(d: Duration) -> int | None:
    """The server's reading of a Duration: ms, or None when it is no valid duration."""
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 1_000_000_000:
        return None
    ms = d.seconds * 1000 + d.nanos // 1_000_000
    return ms if ms <= TEN_YEARS_MS else None


def timestamp_ok(t: Timestamp) -> bool:
    return MIN_TS <= t.seconds <= MAX_TS and 0 <= t.nanos < 1_000_000_000


def millis(ms: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(ms)
    return d


def stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


any_durations = st.one_of(
    st.integers(0, TEN_YEARS_MS).map(millis),
    st.integers(-(10**12), -1).map(millis),
    st.builds(Duration, seconds=int64, nanos=int32),
    st.builds(Duration, seconds=st.integers(0, 100), nanos=st.sampled_from([-1, 10**9])),
)
any_timestamps = st.one_of(
    st.builds(stamp, st.integers(MIN_TS, MAX_TS), st.integers(0, 999_999_999)),
    st.builds(stamp, int64, int32),
    st.builds(stamp, st.integers(0, 10), st.sampled_from([-1, 10**9])),
)


def id_like(prefix: str) -> st.SearchStrategy[str]:
    """Well-formed ids nobody has, and near misses."""
    well_formed = st.text(ID_CHARS, min_size=26, max_size=26).map(lambda s: prefix + s)
    return st.one_of(
        well_formed,
        well_formed.map(lambda s: s + "\n"),
        well_formed.map(str.upper),
        st.just(prefix),
        st.just(prefix + "x" * 37),
        st.just(prefix + "\x00"),
    )


def page_tokens(prefix: str) -> st.SearchStrategy[str]:
    """Page tokens: none, random text, well-formed ones naming an id like ``prefix``, or any
    base64."""
    return st.one_of(
        st.just(""),
        texts,
        id_like(prefix).map(page_token_for),
        st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    )


def page_token_for(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def decoded(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        return ""


def json_ok(value: str, limit: int) -> bool:
    if len(value.encode()) > limit:
        return False
    try:
        parsed = json.loads(value or "null", parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError):
        return False
    return all_finite(parsed)


def all_finite(parsed: Any) -> bool:
    """No number in ``parsed`` is infinite or NaN (Python reads 1e400 as inf; the server refuses
    it, as no JSON number is infinite). Keys and strings may say "Infinity"."""
    try:
        json.dumps(parsed, allow_nan=False)
    except ValueError:
        return False
    return True


# Wait tokens: an id, and what completes one.
token_refs = st.one_of(st.sampled_from(["@dev", "@prod"]), id_like("waitpoint_"), texts)
token_data = st.one_of(
    st.just(""),
    json_texts,
    texts,
    st.sampled_from(["{", "[1,]", "NaN", "1e400", '"\\u0000"']),
    st.just(json.dumps("x" * LIMITS.payload_bytes)),
)
