"""Checks on API input, as pure functions: each failure names the field and the problem."""

from __future__ import annotations

import base64
import re

import orjson

from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane_scheduler.engine import TriggerSpec
from runplane_scheduler.retry import MAX_ATTEMPTS_CAP
from runplane_server.config import Limits
from runplane_server.errors import InvalidArgument

TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")


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
    if not value.startswith("run_") or len(value) > 40:
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
    if len(o.concurrency_key) > 256:
        raise InvalidArgument("options.concurrency_key", "over 256 characters")
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
    if not value.startswith("run_"):
        raise InvalidArgument("page_token", "not a token this server issued")
    return value
