"""VersionService's contract under bad input: ListVersions, PromoteVersion and RollbackVersion
with random version names and callers, on a ``RunWorld`` whose executors registered one version
in each environment. A refusal names the field at fault (or why) and changes nothing; another
environment's version is never found.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runplane.v1 import run_service_pb2 as rpb
from runplane.v1 import version_service_pb2 as vpb
from tests.helpers.contract import (
    FAILED_PRECONDITION,
    FUZZ,
    NOT_FOUND,
    OK,
    RUN,
    TRIGGERABLE,
    UNAUTHENTICATED,
    assert_proper,
    assert_refused,
    assert_unchanged,
)
from tests.helpers.inputs import auths, id_like, texts
from tests.helpers.worlds import RunWorld

pytestmark = pytest.mark.timeout(600)

VERSIONS = "/runplane.v1.VersionService/"
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")

version_names = st.one_of(
    st.sampled_from(["@dev", "@prod"]),  # the world's registered versions
    st.just(""),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.+-]{0,40}\Z"),
    st.sampled_from(["v" * 65, " v1", "v1\n", "-v1", ".", "v1/2", "défaut"]),
    texts,
)


def _versions(w: RunWorld, who: str) -> list[vpb.WorkerVersion]:
    response = w.ok(
        VERSIONS + "ListVersions", vpb.ListVersionsRequest(), who, vpb.ListVersionsResponse
    )
    return list(response.versions)


@given(name=version_names, who=auths)
@FUZZ
def test_promote_version_with_random_names_answers_properly(
    run_world: RunWorld, name: str, who: str
) -> None:
    w = run_world
    registered = {env: [v.version for v in _versions(w, env)] for env in ("dev", "prod")}
    version = registered[name[1:]][0] if name in ("@dev", "@prod") else name
    before = w.state()
    request = vpb.PromoteVersionRequest(version=version)
    outcome = w.call(VERSIONS + "PromoteVersion", request, who, vpb.PromoteVersionResponse)
    what = f"PromoteVersion({version!r}) as {who!r}"
    assert_proper(outcome, what)
    if outcome.code is not OK:
        assert_unchanged(before, w.state(), f"{what} refused with {outcome}")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
    elif not VERSION_NAME.fullmatch(version):
        assert_refused(outcome, {"version"}, what)
    elif version not in registered[who]:
        assert outcome.code is NOT_FOUND, f"{what}: {outcome}"
        assert "version" in outcome.details, str(outcome)
    else:
        assert outcome.code is OK, f"{what}: {outcome}"
        got = outcome.responses[0].version
        assert got.version == version and sorted(got.current_for) == sorted(got.task_ids)
        assert got.HasField("promoted_at")


@pytest.mark.parametrize("who", ["dev", "prod"])
def test_rollback_with_one_promotion_is_refused_and_changes_nothing(
    run_world: RunWorld, who: str
) -> None:
    w = run_world
    before = w.state()
    outcome = w.call(
        VERSIONS + "RollbackVersion", vpb.RollbackVersionRequest(), who, vpb.RollbackVersionResponse
    )
    assert_proper(outcome, "RollbackVersion")
    assert outcome.code is FAILED_PRECONDITION, str(outcome)
    assert "roll back" in outcome.details
    assert_unchanged(before, w.state(), "a refused RollbackVersion")
    [only] = _versions(w, who)
    assert only.current_for and not only.rolled_back


def test_each_environment_lists_only_its_own_versions(run_world: RunWorld) -> None:
    dev = _versions(run_world, "dev")
    prod = _versions(run_world, "prod")
    assert len(dev) == len(prod) == 1
    assert set(dev[0].task_ids).isdisjoint(set(prod[0].task_ids) - set(TRIGGERABLE))
    assert dev[0].active_runs >= 0 and dev[0].HasField("created_at")


run_refs = st.one_of(
    st.sampled_from(["@dev", "@prod", "@dev-canceled"]),
    id_like("run_"),
    texts,
)


@pytest.fixture
def settled_world(run_world: RunWorld) -> RunWorld:
    """``run_world`` with every run canceled: its task's executor went away, so its runs waited
    in PENDING_VERSION, and here none may."""
    for run_id, env in run_world.run_env.items():
        run_world.call(RUN + "CancelRun", rpb.CancelRunRequest(run_id=run_id), env)
    return run_world


@given(
    refs=st.lists(run_refs, max_size=3),
    from_version=version_names,
    to_version=version_names,
    fail=st.booleans(),
    who=auths,
)
@FUZZ
def test_migrate_runs_with_random_requests_answers_properly(
    settled_world: RunWorld,
    refs: list[str],
    from_version: str,
    to_version: str,
    fail: bool,
    who: str,
) -> None:
    """No run of the world waits in PENDING_VERSION, so no request may change anything: a
    well-formed one moves nothing and reports the runs it was given by id as skipped."""
    w = settled_world
    registered = {env: [v.version for v in _versions(w, env)] for env in ("dev", "prod")}

    def version_of(name: str) -> str:
        return registered[name[1:]][0] if name in ("@dev", "@prod") else name

    run_ids = [w.resolve(ref) for ref in refs]
    request = vpb.MigrateRunsRequest(
        run_ids=run_ids,
        from_version=version_of(from_version),
        to_version=version_of(to_version),
        fail=fail,
    )
    before = w.state()
    outcome = w.call(VERSIONS + "MigrateRuns", request, who, vpb.MigrateRunsResponse)
    what = f"MigrateRuns({request}) as {who!r}"
    assert_proper(outcome, what)
    assert_unchanged(before, w.state(), f"{what} answered {outcome}")
    if who not in ("dev", "prod"):
        assert outcome.code is UNAUTHENTICATED, str(outcome)
        return
    if bool(run_ids) == bool(request.from_version):
        assert_refused(outcome, {"run_ids"}, what)
    elif bool(request.to_version) == fail:
        assert outcome.code is not OK, f"{what}: {outcome}"
    elif outcome.code is OK:
        got = outcome.responses[0]
        assert list(got.migrated) == [], what
        assert sorted(got.skipped) == sorted(set(run_ids)), what
        assert all(w.run_env.get(r) == who for r in run_ids), what
        assert not request.to_version or request.to_version in registered[who], what
    elif outcome.code is NOT_FOUND:
        assert any(w.run_env.get(r) != who for r in run_ids), what
    else:
        assert_refused(outcome, {"run_ids", "from_version", "to_version"}, what)
