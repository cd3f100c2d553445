"""Checks on API input, as pure functions: each failure names the field and the problem."""

from __future__ import annotations

import base64
import math
import re

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_scheduler.engine import TriggerSpec
from runplane_scheduler.retry import MAX_ATTEMPTS_CAP
from runplane_server.config import Limits
from runplane_server.errors import InvalidArgument

TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
RUN_ID = re.compile(r"^run_[0-9a-z]{1,36}$")
EXECUTOR_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,40}$")
MACHINES = frozenset(
    {"micro", "small-1x", "small-2x", "medium-1x", "medium-2x", "large-1x", "large-2x"}
)


def text(field: str, value: str, max_length: int) -> str:
    """``value`` if it fits ``max_length`` and holds no NUL (which PostgreSQL cannot store)."""
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    if len(value) > max_length:
        raise InvalidArgument(field, f"{len(value)} characters is over the limit of {max_length}")
    return value


def timestamp_ms(field: str, message: Timestamp) -> int:
    try:
        ms = message.ToMilliseconds()
        message.ToDatetime()  # range check: years 1..9999
    except (ValueError, OverflowError):
        raise InvalidArgument(
            field, "not a valid timestamp (years 1..9999, nanos 0..999999999)"
        ) from None
    if not 0 <= message.nanos < 1_000_000_000:
        raise InvalidArgument(field, "nanos must be 0..999999999")
    return int(ms)


def finite(field: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(field, f"must be a number in {low:g}..{high:g}, got {value!r}")
    return value


def register(message: wpb.Register) -> wpb.Register:
    """An executor's registration, checked before anything of it is stored."""
    if message.executor_id and not EXECUTOR_ID.match(message.executor_id):
        raise InvalidArgument("register.executor_id", "1-40 of letters, digits and _.:-")
    if not 0 <= message.capacity <= 100_000:
        raise InvalidArgument("register.capacity", f"must be 0..100000, got {message.capacity}")
    for i, attempt_id in enumerate(message.running_attempt_ids):
        text(f"register.running_attempt_ids[{i}]", attempt_id, 40)
    seen: set[str] = set()
    for i, t in enumerate(message.manifest.tasks):
        where = f"register.manifest.tasks[{i}]"
        task_id(t.id, f"{where}.id")
        if t.id in seen:
            raise InvalidArgument(f"{where}.id", f"task {t.id!r} is defined twice")
        seen.add(t.id)
        if t.queue and not TASK_ID.match(t.queue):
            raise InvalidArgument(f"{where}.queue", f"{t.queue[:80]!r} is not a queue name")
        if not 0 <= t.queue_concurrency_limit <= 1_000_000:
            raise InvalidArgument(f"{where}.queue_concurrency_limit", "must be 0..1000000")
        if t.machine and t.machine not in MACHINES:
            raise InvalidArgument(f"{where}.machine", f"unknown machine {t.machine[:40]!r}")
        text(f"{where}.description", t.description, 2000)
        finite(f"{where}.max_duration_seconds", t.max_duration_seconds, 0, 365 * 86400)
        r = t.retry
        if not 0 <= r.max_attempts <= MAX_ATTEMPTS_CAP:
            raise InvalidArgument(f"{where}.retry.max_attempts", f"must be 0..{MAX_ATTEMPTS_CAP}")
        finite(f"{where}.retry.factor", r.factor, 0, 100)
        finite(f"{where}.retry.min_timeout_seconds", r.min_timeout_seconds, 0, 365 * 86400)
        finite(f"{where}.retry.max_timeout_seconds", r.max_timeout_seconds, 0, 365 * 86400)
    return message


def json_text(field: str, text: str, limit: int, limit_name: str, *, default: str) -> str:
    """``text`` if it is valid JSON within ``limit`` bytes ('' means ``default``)."""
    if not text:
        return default
    size = len(text.encode())
    if size > limit:
        raise InvalidArgument(
            field, f"{size} bytes is over the {limit_name} limit of {limit} bytes"
        )
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidArgument(field, f"not valid JSON ({error})") from None
    return text


def task_id(value: str, field: str = "task_id") -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not TASK_ID.match(value):
        raise InvalidArgument(
            field, f"{value[:80]!r} is not a task id (1-128 of letters, digits and _.:/-)"
        )
    return value


def run_id(value: str, field: str = "run_id") -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not RUN_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a run id (run_...)")
    return value


def trigger(request: rpb.TriggerRunRequest, limits: Limits) -> TriggerSpec:
    o = request.options
    tags = tuple(o.tags)
    if len(tags) > limits.tags:
        raise InvalidArgument(
            "options.tags", f"{len(tags)} tags is over the limit of {limits.tags}"
        )
    for i, tag in enumerate(tags):
        text(f"options.tags[{i}]", tag, limits.tag_length)
        if not 1 <= len(tag) <= limits.tag_length:
            raise InvalidArgument(
                f"options.tags[{i}]",
                f"a tag must be 1..{limits.tag_length} characters, got {len(tag)}",
            )
    metadata = json_text(
        "options.metadata", o.metadata, limits.metadata_bytes, "metadata", default="{}"
    )
    if not isinstance(orjson.loads(metadata), dict):
        raise InvalidArgument("options.metadata", "must be a JSON object")
    if not 0 <= o.max_attempts <= MAX_ATTEMPTS_CAP:
        raise InvalidArgument(
            "options.max_attempts", f"must be 1..{MAX_ATTEMPTS_CAP}, got {o.max_attempts}"
        )
    if len(o.idempotency_key) > limits.idempotency_key_length:
        raise InvalidArgument(
            "options.idempotency_key",
            f"{len(o.idempotency_key)} characters is over the limit of "
            f"{limits.idempotency_key_length}",
        )
    if o.priority < 0:
        raise InvalidArgument("options.priority", f"must not be negative, got {o.priority}")
    text("options.concurrency_key", o.concurrency_key, 256)
    text("options.idempotency_key", o.idempotency_key, limits.idempotency_key_length)
    if o.queue and not TASK_ID.match(o.queue):
        raise InvalidArgument("options.queue", f"{o.queue[:80]!r} is not a queue name")
    return TriggerSpec(
        task_id=task_id(request.task_id),
        payload=json_text(
            "payload", request.payload, limits.payload_bytes, "payload", default="null"
        ),
        queue=o.queue,
        tags=tags,
        metadata=metadata,
        max_attempts=o.max_attempts,
        idempotency_key=o.idempotency_key,
        concurrency_key=o.concurrency_key,
        priority=o.priority,
        parent_run_id=run_id(o.parent_run_id, "options.parent_run_id") if o.parent_run_id else "",
    )


def statuses(values: list[int]) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v not in run_pb2.RunStatus.values() or v == run_pb2.RUN_STATUS_UNSPECIFIED:
            raise InvalidArgument(f"statuses[{i}]", f"{v} is not a run status")
        out.append(
            run_pb2.RunStatus.Name(run_pb2.RunStatus.ValueType(v)).removeprefix("RUN_STATUS_")
        )
    return out


def page_size(value: int, maximum: int) -> int:
    if value < 0 or value > maximum:
        raise InvalidArgument("page_size", f"must be 0..{maximum}, got {value}")
    return value or 25


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def decode_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        value = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise InvalidArgument("page_token", "not a token this server issued") from None
    if not RUN_ID.match(value):
        raise InvalidArgument("page_token", "not a token this server issued")
    return value


# -- executor area: metadata, tags, logs -------------------------------------------------------

LOG_ID = re.compile(r"^log_[0-9a-z]{1,36}$")


def metadata_object(field: str, value: str, limits: Limits) -> str:
    """JSON text of a metadata object within the metadata limit."""
    value = json_text(field, value, limits.metadata_bytes, "metadata", default="{}")
    if not isinstance(orjson.loads(value), dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def tags_to_add(values: list[str], limits: Limits) -> list[str]:
    """Tags for AddRunTags: 1..limits.tags of 1..tag_length characters each."""
    if not values:
        raise InvalidArgument("tags", "must not be empty")
    if len(values) > limits.tags:
        raise InvalidArgument(
            "tags", f"{len(values)} tags is over the limit of {limits.tags} tags per run"
        )
    for i, tag in enumerate(values):
        text(f"tags[{i}]", tag, limits.tag_length)
        if not tag:
            raise InvalidArgument(
                f"tags[{i}]", f"a tag must be 1..{limits.tag_length} characters, got 0"
            )
    return values


def log_page_size(value: int) -> int:
    if not 0 <= value <= 1000:
        raise InvalidArgument("page_size", f"must be 0..1000, got {value}")
    return value or 100


def decode_log_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        value = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise InvalidArgument("page_token", "not a token this server issued") from None
    if not LOG_ID.match(value):
        raise InvalidArgument("page_token", "not a token this server issued")
    return value
