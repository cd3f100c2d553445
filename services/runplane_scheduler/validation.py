"""Checks on API input, as pure functions: each failure names the field and the problem."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from typing import Any

import jsonschema
import orjson
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from runplane.v1 import run_pb2
from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import version_service_pb2 as vpb
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common import protocol
from runplane_common.config import Limits
from runplane_common.errors import FailedPrecondition, InvalidArgument
from runplane_common.protocol import SPOKEN_WORKER_PROTOCOL_VERSIONS
from runplane_scheduler import json_depth
from runplane_scheduler.retry import MAX_ATTEMPTS_CAP
from runplane_scheduler.specs import Debounce, TriggerSpec

TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}\Z")
# A worker version: "v1", "2026.12.05-1", a content hash.
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
RUN_ID = re.compile(r"^run_[0-9a-z]{1,36}\Z")
EXECUTOR_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,40}\Z")
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
    spoken = SPOKEN_WORKER_PROTOCOL_VERSIONS
    if protocol.effective_version(message.protocol_version) not in spoken:
        raise FailedPrecondition(
            f"worker protocol version {message.protocol_version} is not spoken by this "
            f"scheduler (it speaks {', '.join(map(str, spoken))}; docs/worker-protocol.md)"
        )
    if message.executor_id and not EXECUTOR_ID.match(message.executor_id):
        raise InvalidArgument("register.executor_id", "1-40 of letters, digits and _.:-")
    if not 0 <= message.capacity <= 100_000:
        raise InvalidArgument("register.capacity", f"must be 0..100000, got {message.capacity}")
    for i, attempt_id in enumerate(message.running_attempt_ids):
        text(f"register.running_attempt_ids[{i}]", attempt_id, 40)
    if message.manifest.version:
        version(message.manifest.version, "register.manifest.version")
    seen: set[str] = set()
    for i, t in enumerate(message.manifest.tasks):
        where = f"register.manifest.tasks[{i}]"
        task_id(t.id, f"{where}.id")
        if t.id in seen:
            raise InvalidArgument(f"{where}.id", f"task {t.id!r} is defined twice")
        seen.add(t.id)
        if t.queue and not TASK_ID.match(t.queue):
            raise InvalidArgument(f"{where}.queue", f"{t.queue[:80]!r} is not a queue name")
        if t.queue.startswith("queue_"):  # the prefix names queues by id
            raise InvalidArgument(f"{where}.queue", "a queue name must not start with 'queue_'")
        if not 0 <= t.queue_concurrency_limit <= 1_000_000:
            raise InvalidArgument(f"{where}.queue_concurrency_limit", "must be 0..1000000")
        if t.machine and t.machine not in MACHINES:
            raise InvalidArgument(f"{where}.machine", f"unknown machine {t.machine[:40]!r}")
        text(f"{where}.description", t.description, 2000)
        finite(f"{where}.max_duration_seconds", t.max_duration_seconds, 0, 365 * 86400)
        finite(f"{where}.ttl_seconds", t.ttl_seconds, 0, 3650 * 86400)
        if not 0 <= t.queue_rate_limit <= 1_000_000:
            raise InvalidArgument(f"{where}.queue_rate_limit", "must be 0..1000000")
        finite(f"{where}.queue_rate_period_seconds", t.queue_rate_period_seconds, 0, 366 * 86400)
        if t.queue_rate_limit and t.queue_rate_period_seconds <= 0:
            raise InvalidArgument(
                f"{where}.queue_rate_period_seconds", "must be > 0 with a rate limit"
            )
        if not 0 <= t.queue_total_concurrency_limit <= 1_000_000:
            raise InvalidArgument(f"{where}.queue_total_concurrency_limit", "must be 0..1000000")
        if t.payload_schema:
            _schema(f"{where}.payload_schema", t.payload_schema)
        r = t.retry
        if not 0 <= r.max_attempts <= MAX_ATTEMPTS_CAP:
            raise InvalidArgument(f"{where}.retry.max_attempts", f"must be 0..{MAX_ATTEMPTS_CAP}")
        finite(f"{where}.retry.factor", r.factor, 0, 100)
        finite(f"{where}.retry.min_timeout_seconds", r.min_timeout_seconds, 0, 365 * 86400)
        finite(f"{where}.retry.max_timeout_seconds", r.max_timeout_seconds, 0, 365 * 86400)
    return message


def _schema(field: str, value: str) -> None:
    """A JSON Schema the scheduler can check payloads against."""
    text(field, value, 256 * 1024)
    try:
        schema = orjson.loads(value)
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except orjson.JSONDecodeError as error:
        raise InvalidArgument(field, f"not valid JSON ({error})") from None
    except jsonschema.exceptions.SchemaError as error:
        raise InvalidArgument(field, f"not a valid JSON Schema: {error.message[:200]}") from None


def json_text(
    field: str, text: str, limit: int, limit_name: str, *, default: str, depth: int
) -> str:
    """``text`` if it is valid JSON within ``limit`` bytes, nested at most ``depth`` deep (''
    means ``default``)."""
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
    if json_depth.too_deep(text, depth):
        raise InvalidArgument(
            field, f"nested deeper than the JSON depth limit of {depth} (RUNPLANE_LIMIT_JSON_DEPTH)"
        )
    return text


def filter_sizes(request: Any, fields: tuple[str, ...], limits: Limits) -> None:
    """A listing's repeated filters hold at most ``limits.filter_values`` values each."""
    for name in fields:
        count = len(getattr(request, name))
        if count > limits.filter_values:
            raise InvalidArgument(
                name, f"{count} values is over the limit of {limits.filter_values} per filter"
            )


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


MAX_DURATION_MS = 3650 * 86_400_000  # ten years: longer durations are surely mistakes


def duration_ms(field: str, value: Duration, *, minimum_ms: int = 0) -> int:
    """A non-negative protobuf Duration in ms, within ``minimum_ms``..ten years."""
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(field, "must not be negative")
    if value.nanos >= 1_000_000_000:
        raise InvalidArgument(field, "nanos must be 0..999999999")
    ms = value.seconds * 1000 + value.nanos // 1_000_000
    if ms > MAX_DURATION_MS:
        raise InvalidArgument(field, f"{value.seconds} s is over the maximum of ten years")
    if ms < minimum_ms:
        raise InvalidArgument(
            field, f"must be at least {minimum_ms / 1000:g} s, got {ms / 1000:g} s"
        )
    return ms


def machine(field: str, value: str) -> str:
    if value and value not in MACHINES:
        raise InvalidArgument(
            field, f"unknown machine {value[:40]!r} (one of {', '.join(sorted(MACHINES))})"
        )
    return value


def trigger(request: rpb.TriggerRunRequest, limits: Limits) -> TriggerSpec:
    return trigger_spec(request.task_id, request.payload, request.options, limits)


def trigger_spec(
    task: str, payload: str, o: rpb.TriggerOptions, limits: Limits, where: str = ""
) -> TriggerSpec:
    """A trigger's task, payload and options, checked; ``where`` prefixes field names (a batch
    item's place)."""
    f = f"{where}options."
    tags = tag_list(f"{f}tags", list(o.tags), limits)
    metadata = json_text(
        f"{f}metadata",
        o.metadata,
        limits.metadata_bytes,
        "metadata",
        default="{}",
        depth=limits.json_depth,
    )
    if not isinstance(orjson.loads(metadata), dict):
        raise InvalidArgument(f"{f}metadata", "must be a JSON object")
    if not 0 <= o.max_attempts <= MAX_ATTEMPTS_CAP:
        raise InvalidArgument(
            f"{f}max_attempts", f"must be 1..{MAX_ATTEMPTS_CAP}, got {o.max_attempts}"
        )
    if len(o.idempotency_key) > limits.idempotency_key_length:
        raise InvalidArgument(
            f"{f}idempotency_key",
            f"{len(o.idempotency_key)} characters is over the limit of "
            f"{limits.idempotency_key_length}",
        )
    if o.priority < 0:
        raise InvalidArgument(f"{f}priority", f"must not be negative, got {o.priority}")
    text(f"{f}concurrency_key", o.concurrency_key, 256)
    text(f"{f}idempotency_key", o.idempotency_key, limits.idempotency_key_length)
    if o.queue and not TASK_ID.match(o.queue):
        raise InvalidArgument(f"{f}queue", f"{o.queue[:80]!r} is not a queue name")
    if o.HasField("delay") and o.HasField("delay_until"):
        raise InvalidArgument(f"{f}delay_until", "give delay or delay_until, not both")
    delay_until = 0
    if o.HasField("delay"):
        delay_until = int(time.time() * 1000) + duration_ms(f"{f}delay", o.delay)
    elif o.HasField("delay_until"):
        delay_until = timestamp_ms(f"{f}delay_until", o.delay_until)
    if o.parent_run_id:
        run_id(o.parent_run_id, f"{f}parent_run_id")
    if o.version:
        version(o.version, f"{f}version")
    debounce = None
    if o.HasField("debounce"):
        if o.HasField("delay") or o.HasField("delay_until"):
            raise InvalidArgument(f"{f}debounce", "give delay or debounce, not both")
        debounce = _debounce(f"{f}debounce", o.debounce)
    return TriggerSpec(
        task_id=task_id(task, f"{where}task_id"),
        payload=json_text(
            f"{where}payload",
            payload,
            limits.payload_bytes,
            "payload",
            default="null",
            depth=limits.json_depth,
        ),
        queue=o.queue,
        tags=tags,
        metadata=metadata,
        max_attempts=o.max_attempts,
        idempotency_key=o.idempotency_key,
        idempotency_key_ttl_ms=duration_ms(
            f"{f}idempotency_key_ttl", o.idempotency_key_ttl, minimum_ms=1000
        )
        if o.HasField("idempotency_key_ttl")
        else 0,
        concurrency_key=o.concurrency_key,
        priority=o.priority,
        delay_until=delay_until,
        # ttl 0 opts out of the task's ttl; otherwise at least a second (reference §2.2).
        ttl_ms=_ttl(f"{f}ttl", o.ttl) if o.HasField("ttl") else None,
        max_duration_ms=duration_ms(f"{f}max_duration", o.max_duration, minimum_ms=1000)
        if o.HasField("max_duration")
        else None,
        machine=machine(f"{f}machine", o.machine),
        parent_run_id=o.parent_run_id,
        debounce=debounce,
        version=o.version,
    )


def _debounce(field: str, d: rpb.Debounce) -> Debounce:
    if not 1 <= len(d.key) <= 512:
        raise InvalidArgument(f"{field}.key", f"must be 1..512 characters, got {len(d.key)}")
    text(f"{field}.key", d.key, 512)
    if d.mode not in rpb.DebounceMode.values():
        raise InvalidArgument(f"{field}.mode", f"{d.mode} is not a debounce mode")
    if not d.HasField("delay"):
        raise InvalidArgument(f"{field}.delay", "is required")
    delay = duration_ms(f"{field}.delay", d.delay, minimum_ms=1000)
    max_delay = 0
    if d.HasField("max_delay"):
        max_delay = duration_ms(f"{field}.max_delay", d.max_delay)
        if max_delay <= delay:
            raise InvalidArgument(f"{field}.max_delay", f"must exceed delay ({delay / 1000:g} s)")
    return Debounce(
        key=d.key,
        delay_ms=delay,
        trailing=d.mode == rpb.DEBOUNCE_MODE_TRAILING,
        max_delay_ms=max_delay,
    )


def tag_list(field: str, values: list[str], limits: Limits) -> tuple[str, ...]:
    """At most ``limits.tags`` tags of 1..``limits.tag_length`` characters each."""
    if len(values) > limits.tags:
        raise InvalidArgument(field, f"{len(values)} tags is over the limit of {limits.tags}")
    for i, tag in enumerate(values):
        text(f"{field}[{i}]", tag, limits.tag_length)
        if not tag:
            raise InvalidArgument(
                f"{field}[{i}]", f"a tag must be 1..{limits.tag_length} characters, got 0"
            )
    return tuple(values)


def _ttl(field: str, value: Duration) -> int:
    ms = duration_ms(field, value)
    return ms if ms == 0 else duration_ms(field, value, minimum_ms=1000)


def batch(request: rpb.BatchTriggerRunsRequest, limits: Limits) -> list[TriggerSpec]:
    if not request.items:
        raise InvalidArgument("items", "a batch needs at least one item")
    if len(request.items) > limits.batch_items:
        raise InvalidArgument(
            "items", f"{len(request.items)} items is over the batch limit of {limits.batch_items}"
        )
    text("idempotency_key", request.idempotency_key, limits.idempotency_key_length)
    return [
        trigger_spec(item.task_id, item.payload, item.options, limits, f"items[{i}].")
        for i, item in enumerate(request.items)
    ]


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


BATCH_ID = re.compile(r"^batch_[0-9a-z]{1,36}\Z")


def batch_id(value: str, field: str = "batch_id") -> str:
    if not BATCH_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a batch id (batch_...)")
    return value


def queue_ref(value: str, field: str = "queue") -> str:
    """A queue id (``queue_...``) or name."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not TASK_ID.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a queue id or name")
    return value


def version(value: str, field: str = "version") -> str:
    """A worker version name: 1..64 of letters, digits and ``_ . + -``, starting with a letter
    or digit."""
    if not VERSION.match(value):
        raise InvalidArgument(
            field,
            f"{value[:80]!r} is not a version (1..64 of letters, digits, '_', '.', '+', '-', "
            "starting with a letter or digit)",
        )
    return value


MIGRATE_MAX_IDS = 1000


def migration(request: vpb.MigrateRunsRequest) -> tuple[list[str], str, str]:
    """A MigrateRunsRequest: (run ids, from_version, to_version; '' to fail the runs)."""
    run_ids, from_version = list(request.run_ids), request.from_version
    to_version, fail = request.to_version, request.fail
    if bool(run_ids) == bool(from_version):
        raise InvalidArgument("run_ids", "give either run_ids or from_version (exactly one)")
    if len(run_ids) > MIGRATE_MAX_IDS:
        raise InvalidArgument("run_ids", f"at most {MIGRATE_MAX_IDS} runs, got {len(run_ids)}")
    for i, value in enumerate(run_ids):
        run_id(value, f"run_ids[{i}]")
    if from_version:
        version(from_version, "from_version")
    if bool(to_version) == fail:
        raise InvalidArgument("to_version", "give either to_version or fail (exactly one)")
    if to_version:
        version(to_version, "to_version")
    return list(dict.fromkeys(run_ids)), from_version, to_version


def page_filters(request: Message) -> str:
    """A digest of what a list request asks for, everything but its page token and size: a
    page token is good only for requests that ask for the same (AIP-158)."""
    asked = type(request)()
    asked.CopyFrom(request)
    for name in ("page_token", "page_size"):
        if name in asked.DESCRIPTOR.fields_by_name:
            asked.ClearField(name)
    return hashlib.sha256(asked.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode_page_token(last_id: str, filters: str = "") -> str:
    """A token for the page after ``last_id``, bound to ``filters`` (see page_filters)."""
    return base64.urlsafe_b64encode(f"{last_id}\n{filters}".encode()).decode()


def decode_page_token(token: str, last: re.Pattern[str] = RUN_ID, filters: str = "") -> str | None:
    """The last id (or name) of the previous page, which must match ``last``; None: from the
    start. A token issued for other filters is INVALID_ARGUMENT. A token without filters (as
    servers before page_filters issued) is taken as it is."""
    if not token:
        return None
    try:
        value = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise InvalidArgument("page_token", "not a token this server issued") from None
    value, bound, issued_for = value.partition("\n")
    if not last.match(value):
        raise InvalidArgument("page_token", "not a token this server issued")
    if bound and issued_for != filters:
        raise InvalidArgument(
            "page_token",
            "issued for a request with other filters: a page token goes only with the filters "
            "of the request that returned it (start again without a token to change them)",
        )
    return value


# -- executor area: metadata, tags, logs -------------------------------------------------------

LOG_ID = re.compile(r"^log_[0-9a-z]{1,36}\Z")


def metadata_object(field: str, value: str, limits: Limits) -> str:
    """JSON text of a metadata object within the metadata limit."""
    value = json_text(
        field, value, limits.metadata_bytes, "metadata", default="{}", depth=limits.json_depth
    )
    if not isinstance(orjson.loads(value), dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def tags_to_add(values: list[str], limits: Limits) -> list[str]:
    """Tags for AddRunTags: 1..limits.tags of 1..tag_length characters each."""
    if not values:
        raise InvalidArgument("tags", "must not be empty")
    return list(tag_list("tags", values, limits))


def log_page_size(value: int) -> int:
    if not 0 <= value <= 1000:
        raise InvalidArgument("page_size", f"must be 0..1000, got {value}")
    return value or 100
