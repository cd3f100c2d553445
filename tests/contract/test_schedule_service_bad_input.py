"""ScheduleService's contract under bad input: CreateSchedule, UpdateSchedule, the calls by id,
ListSchedules and ListTimezones with random crons, timezones, ids and page tokens. The schedule
clock all but stands still (``frozen_stack``), so no schedule fires while a test runs and
schedule rows compare exactly.
"""

from __future__ import annotations

import re
import uuid
import zoneinfo
from typing import Any

import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane.v1 import schedule_service_pb2 as spb
from runplane_scheduler.store import tables as db
from tests.helpers.contract import (
    FAILED_PRECONDITION,
    FUZZ,
    INVALID,
    KEYS,
    LIMITS,
    NOT_FOUND,
    OK,
    SCHED,
    UNAUTHENTICATED,
    assert_proper,
    assert_refused,
    other_env,
)
from tests.helpers.inputs import (
    TASK_ID,
    auths,
    decoded,
    id_like,
    int32,
    page_tokens,
    task_id_ok,
    texts,
)
from tests.helpers.worlds import (
    DECLARED,
    TASKS,
    ScheduleWorld,
)

pytestmark = pytest.mark.timeout(600)

SCHEDULE_ID = re.compile(r"sched_[0-9a-z]{1,36}")


# -- ScheduleService -------------------------------------------------------------------------------

VALID_CRONS = [
    "* * * * *",
    "0 9 * * 1-5",
    "*/15 * * * *",
    "0 0 L * *",
    "0 0 * * 5L",
    "30 2 * * *",
    "0 0 29 2 *",
    "0 0 29 2 1",
    "5,10,15 1-3 */2 JAN-MAR MON,FRI",
    "0 0 ? * SUN",
]
BAD_CRONS = [
    "",
    "60 * * * *",
    "* 24 * * *",
    "* * * * * *",
    "* * * *",
    "L * * * *",
    "*/0 * * * *",
    "5-1 * * * *",
    "0 0 31 2 *",
    "0 0 30 2 *",
    "@daily",
    "\u0663 * * * *",
    "\u00b2 * * * *",
    "* * * * 8",
    "1,,2 * * * *",
    "0 0 * * L",
    "* * * * *\x00",
    "9" * 40 + " * * * *",
    " ".join(["*"] * 200),
]
TIMEZONES = ["UTC", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
BAD_TIMEZONES = [
    "utc",
    "Europe/Nowhere",
    "../../etc/passwd",
    "Europe/London\x00",
    "+05:00",
    "GMT+25",
]
# Parsed or refused, either is right: a step longer than its range means its first value.
ODD_CRONS = ["*/" + "9" * 40 + " * * * *", "0/59 * * * *"]
cron_texts = st.one_of(
    st.sampled_from(VALID_CRONS), st.sampled_from(BAD_CRONS), st.sampled_from(ODD_CRONS), texts
)
timezone_texts = st.one_of(
    st.just(""), st.sampled_from(TIMEZONES), st.sampled_from(BAD_TIMEZONES), texts
)
short_texts = st.one_of(st.just(""), task_id_ok, texts, st.just("e" * 257), st.just("a\x00b"))
schedule_refs = st.one_of(st.sampled_from(["@dev", "@prod", "@declared"]), id_like("sched_"), texts)


def _tz_ok(value: str) -> bool:
    return (
        value == "" or value in TIMEZONES or (value not in BAD_TIMEZONES and _known_timezone(value))
    )


def _known_timezone(value: str) -> bool:
    return value in zoneinfo.available_timezones()


def _text_ok(value: str) -> bool:
    return len(value) <= 256 and "\x00" not in value


def _schedule_rows(w: ScheduleWorld) -> dict[str, list[tuple[Any, ...]]]:
    return w.rows(db.schedules, db.runs)


@given(
    task=st.one_of(st.sampled_from(["@dev", "@prod", "@declared"]), task_id_ok, texts),
    cron=cron_texts,
    timezone=timezone_texts,
    external_id=short_texts,
    dedup=st.one_of(st.just("dedup-1"), short_texts),
    who=auths,
)
@FUZZ
def test_create_schedule_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld,
    task: str,
    cron: str,
    timezone: str,
    external_id: str,
    dedup: str,
    who: str,
) -> None:
    w = schedule_world
    task = {"@dev": TASKS["dev"], "@prod": TASKS["prod"], "@declared": DECLARED}.get(task, task)
    request = spb.CreateScheduleRequest(
        task_id=task, cron=cron, timezone=timezone, external_id=external_id, deduplication_key=dedup
    )
    what = f"CreateSchedule({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "CreateSchedule", request, who, spb.CreateScheduleResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert _schedule_rows(w) == before, f"{what} refused, yet rows changed"
    mine = {"dev": {TASKS["dev"], DECLARED}, "prod": {TASKS["prod"]}}.get(who, set())
    bad = set()
    if task not in mine:
        bad.add("task_id")
    elif cron in BAD_CRONS:
        bad.add("cron")
    elif cron in VALID_CRONS and not _tz_ok(timezone):
        bad.add("timezone")
    elif cron in VALID_CRONS and not _text_ok(external_id):
        bad.add("external_id")
    elif cron in VALID_CRONS and not _text_ok(dedup):
        bad.add("deduplication_key")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        assert_refused(outcome, bad, what)
    elif cron not in VALID_CRONS:  # random text: parsed or refused, naming the cron
        if outcome.code is not OK:
            assert_refused(outcome, {"cron", "timezone", "external_id", "deduplication_key"}, what)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
    if outcome.code is OK:
        response: spb.CreateScheduleResponse = outcome.responses[0]
        got = response.schedule
        assert (got.task_id, got.timezone, got.external_id) == (
            task,
            timezone or "UTC",
            external_id,
        )
        assert got.active and got.type == spb.SCHEDULE_TYPE_IMPERATIVE
        assert response.created == (not dedup or got.id not in w.schedule_env), str(response)
        if dedup == "dedup-1":
            assert got.id == w.schedules[who]
        w.schedule_env[got.id] = who
        theirs = w.call(
            SCHED + "GetSchedule", spb.GetScheduleRequest(schedule_id=got.id), other_env(who)
        )
        assert theirs.code is NOT_FOUND, str(theirs)
        assert _schedule_rows(w)["runs"] == before["runs"]  # nothing fires


SCHEDULE_ID_METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "GetSchedule": (spb.GetScheduleRequest, spb.GetScheduleResponse),
    "DeleteSchedule": (spb.DeleteScheduleRequest, spb.DeleteScheduleResponse),
    "ActivateSchedule": (spb.ActivateScheduleRequest, spb.ActivateScheduleResponse),
    "DeactivateSchedule": (spb.DeactivateScheduleRequest, spb.DeactivateScheduleResponse),
}


@given(method=st.sampled_from(sorted(SCHEDULE_ID_METHODS)), ref=schedule_refs, who=auths)
@FUZZ
def test_schedule_calls_with_random_ids_answer_properly(
    schedule_world: ScheduleWorld, method: str, ref: str, who: str
) -> None:
    w = schedule_world
    schedule_id = w.resolve(ref)
    request_type, response_type = SCHEDULE_ID_METHODS[method]
    what = f"{method}({schedule_id!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + method, request_type(schedule_id=schedule_id), who, response_type)
    assert_proper(outcome, what)
    if outcome.code is not OK or method == "GetSchedule":
        assert _schedule_rows(w) == before, f"{what}: rows changed"
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not SCHEDULE_ID.fullmatch(schedule_id):
        assert_refused(outcome, {"schedule_id"}, what)
    elif w.schedule_env.get(schedule_id) != who:
        assert outcome.code in (NOT_FOUND, INVALID), f"{what}: {outcome}"
        if outcome.code is INVALID:
            assert_refused(outcome, {"schedule_id"}, what)
    elif schedule_id == w.schedules["declared"] and method != "GetSchedule":
        assert outcome.code is FAILED_PRECONDITION, f"{what}: {outcome}"
        assert "declarative" in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got = outcome.responses[0].schedule
        assert got.id == schedule_id
        if method == "DeleteSchedule":
            del w.schedule_env[schedule_id]
            assert not got.active
        elif method == "ActivateSchedule":
            assert got.active and got.HasField("next_run")
        elif method == "DeactivateSchedule":
            assert not got.active and not got.HasField("next_run")


@given(
    ref=schedule_refs,
    task=st.one_of(st.just(""), st.sampled_from(["@dev", "@prod"]), task_id_ok, texts),
    cron=st.one_of(st.just(""), cron_texts),
    timezone=timezone_texts,
    external_id=st.one_of(st.none(), short_texts),
    who=auths,
)
@FUZZ
def test_update_schedule_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld,
    ref: str,
    task: str,
    cron: str,
    timezone: str,
    external_id: str | None,
    who: str,
) -> None:
    w = schedule_world
    schedule_id = w.resolve(ref)
    task = {"@dev": TASKS["dev"], "@prod": TASKS["prod"]}.get(task, task)
    request = spb.UpdateScheduleRequest(
        schedule_id=schedule_id, task_id=task, cron=cron, timezone=timezone
    )
    if external_id is not None:
        request.external_id = external_id
    what = f"UpdateSchedule({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "UpdateSchedule", request, who, spb.UpdateScheduleResponse)
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert _schedule_rows(w) == before, f"{what} refused, yet rows changed"
    mine = {"dev": {TASKS["dev"], DECLARED}, "prod": {TASKS["prod"]}}.get(who, set())
    bad = set()
    if not SCHEDULE_ID.fullmatch(schedule_id):
        bad.add("schedule_id")
    elif task and task not in mine:
        bad.add("task_id")
    elif cron in BAD_CRONS and cron:
        bad.add("cron")
    elif cron in ("", *VALID_CRONS) and timezone and not _tz_ok(timezone):
        bad.add("timezone")
    elif cron in ("", *VALID_CRONS) and external_id is not None and not _text_ok(external_id):
        bad.add("external_id")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif bad:
        assert_refused(outcome, bad, what)
    elif cron not in ("", *VALID_CRONS) and outcome.code is INVALID:
        assert_refused(outcome, {"cron", "timezone", "external_id", "schedule_id"}, what)
    elif w.schedule_env.get(schedule_id) != who:
        assert outcome.code in (NOT_FOUND, INVALID), f"{what}: {outcome}"
    elif schedule_id == w.schedules["declared"]:
        assert outcome.code is FAILED_PRECONDITION, f"{what}: {outcome}"
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got = outcome.responses[0].schedule
        if task:
            assert got.task_id == task
        if timezone:
            assert got.timezone == timezone
        if external_id is not None:
            assert got.external_id == external_id


@given(
    task_ids=st.lists(
        st.one_of(st.sampled_from(list(TASKS.values())), task_id_ok, texts), max_size=3
    ),
    page_size=st.one_of(st.integers(0, 5), int32),
    token=page_tokens("sched_"),
    who=auths,
)
@FUZZ
def test_list_schedules_with_random_fields_answers_properly(
    schedule_world: ScheduleWorld, task_ids: list[str], page_size: int, token: str, who: str
) -> None:
    w = schedule_world
    request = spb.ListSchedulesRequest(task_ids=task_ids, page_size=page_size, page_token=token)
    what = f"ListSchedules({request!r}) as {who!r}"
    before = _schedule_rows(w)
    outcome = w.call(SCHED + "ListSchedules", request, who, spb.ListSchedulesResponse)
    assert_proper(outcome, what)
    assert _schedule_rows(w) == before
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, f"{what}: {outcome}"
    elif not 0 <= page_size <= LIMITS.page_size:
        assert_refused(outcome, {"page_size"}, what)
    elif not all(TASK_ID.fullmatch(t) for t in task_ids):
        assert_refused(outcome, {"task_ids"}, what)
    elif (token and not decoded(token).startswith("sched_")) or outcome.code is not OK:
        assert_refused(outcome, {"page_token"}, what)
    else:
        got = outcome.responses[0].schedules
        assert all(w.schedule_env.get(s.id) == who for s in got), str(got)
        assert len(got) <= (page_size or 25)
        if task_ids:
            assert all(s.task_id in task_ids for s in got)


@given(exclude_utc=st.booleans(), who=auths)
@settings(FUZZ, max_examples=10)
def test_list_timezones_answers_properly(
    schedule_world: ScheduleWorld, exclude_utc: bool, who: str
) -> None:
    outcome = schedule_world.call(
        SCHED + "ListTimezones",
        spb.ListTimezonesRequest(exclude_utc=exclude_utc),
        who,
        spb.ListTimezonesResponse,
    )
    assert_proper(outcome, f"ListTimezones as {who!r}")
    if who not in KEYS:
        assert outcome.code is UNAUTHENTICATED, str(outcome)
        return
    assert outcome.code is OK, str(outcome)
    names = list(outcome.responses[0].timezones)
    assert names == sorted(names) and "Europe/London" in names
    assert ("UTC" in names) is not exclude_utc


@given(
    cron=st.sampled_from(VALID_CRONS),
    timezone=st.sampled_from(["", *TIMEZONES]),
    external_id=st.one_of(st.just(""), task_id_ok),
    keyed=st.booleans(),
)
@settings(FUZZ, max_examples=30)
def test_a_valid_schedule_is_accepted_and_found(
    schedule_world: ScheduleWorld, cron: str, timezone: str, external_id: str, keyed: bool
) -> None:
    w = schedule_world
    dedup = uuid.uuid4().hex if keyed else ""
    request = spb.CreateScheduleRequest(
        task_id=TASKS["dev"],
        cron=cron,
        timezone=timezone,
        external_id=external_id,
        deduplication_key=dedup,
    )
    got = w.ok(SCHED + "CreateSchedule", request, "dev", spb.CreateScheduleResponse)
    assert got.created and got.schedule.cron == cron
    assert got.schedule.next_run.seconds > 0
    found = w.ok(
        SCHED + "GetSchedule",
        spb.GetScheduleRequest(schedule_id=got.schedule.id),
        "dev",
        spb.GetScheduleResponse,
    )
    assert found.schedule == got.schedule
