"""The executor's eviction policy for waiting attempts (``ResidentWaits``), against an injected
clock: which waits stay in memory and which are evicted to be replayed from the journal."""

from __future__ import annotations

from runplane_executor.waits import ResidentWaits

T0 = 1_000_000.0
TOKEN = {"token_id": "waitpoint_x"}


def seconds(s: float) -> dict[str, int]:
    return {"duration_ms": int(s * 1000)}


def test_a_wait_is_not_evicted_before_it_settles_so_a_journaled_answer_comes_first() -> None:
    policy = ResidentWaits(max_resident=1, evict_after=5, settle=1)
    policy.wait("a", 1, seconds(3600), T0)
    policy.wait("b", 1, TOKEN, T0)
    assert policy.due(T0 + 0.5) == []
    assert (policy.resident, policy.waiting) == (0, 2)
    policy.resumed("b", [1])  # answered from the journal within the settle time
    assert policy.next_check() == T0 + 1
    assert policy.due(T0 + 1) == ["a"]  # an hour-long duration: evicted once settled
    assert (policy.resident, policy.waiting, policy.evicted) == (0, 0, 1)


def test_short_durations_stay_resident_and_tokens_go_after_evict_after() -> None:
    policy = ResidentWaits(max_resident=0, evict_after=5, settle=1)
    policy.wait("short", 1, seconds(1), T0)
    policy.wait("four", 1, seconds(4), T0)
    policy.wait("token", 1, TOKEN, T0)
    policy.wait("children", 1, {"children": [b"x"]}, T0 + 2)
    assert policy.due(T0 + 1) == []
    assert policy.resident == 3
    policy.resumed("short", [1])
    assert policy.next_check() == T0 + 3  # the children wait settles
    assert policy.due(T0 + 4.9) == []
    assert policy.due(T0 + 5) == ["token"]
    assert policy.due(T0 + 7) == ["children"]
    assert policy.resident == 1  # the 4 s duration stays until it resumes
    policy.resumed("four", [1])
    assert (policy.resident, policy.waiting, policy.next_check()) == (0, 0, None)


def test_the_cap_evicts_the_waits_expected_to_resume_last() -> None:
    policy = ResidentWaits(max_resident=2, evict_after=0, settle=1)
    policy.wait("old-token", 1, TOKEN, T0)
    policy.wait("new-token", 1, TOKEN, T0 + 0.5)
    policy.wait("d30", 1, seconds(30), T0 + 0.5)
    policy.wait("d10", 1, seconds(10), T0 + 0.5)
    assert policy.due(T0 + 1) == []  # only old-token has settled
    # Four resident, two too many: tokens (end unknown) first, the longest-waiting of them.
    assert policy.due(T0 + 1.5) == ["old-token", "new-token"]
    assert policy.resident == 2 and policy.high_water == 2
    policy.wait("d20", 1, seconds(20), T0 + 2)
    assert policy.due(T0 + 3) == ["d30"]  # then the latest end
    assert policy.evicted == 3 and policy.high_water == 2


def test_parallel_waits_count_once_and_end_when_all_are_answered() -> None:
    policy = ResidentWaits(max_resident=0, evict_after=5, settle=1)
    policy.wait("a", 1, seconds(1), T0)
    policy.wait("a", 2, seconds(2), T0)
    assert policy.due(T0 + 1) == [] and policy.resident == 1
    policy.resumed("a", [1])
    assert policy.waiting == 1
    policy.wait("a", 3, TOKEN, T0 + 1.5)  # now its end is unknown: it ages out
    assert policy.due(T0 + 4.9) == []
    assert policy.due(T0 + 5) == ["a"]
    assert (policy.resident, policy.waiting) == (0, 0)


def test_an_attempt_that_ends_while_waiting_is_forgotten() -> None:
    policy = ResidentWaits(max_resident=1, evict_after=5, settle=1)
    policy.wait("a", 1, TOKEN, T0)
    policy.due(T0 + 1)
    policy.ended("a")
    policy.wait("b", 1, TOKEN, T0 + 2)
    assert policy.due(T0 + 3) == [] and policy.resident == 1
    assert policy.due(T0 + 7) == ["b"]  # a's stale entries evict nothing


def test_off_when_both_rules_are_zero() -> None:
    assert not ResidentWaits(0, 0).enabled
    assert ResidentWaits(5, 0).enabled and ResidentWaits(0, 5).enabled


def test_stale_entries_do_not_grow_without_bound() -> None:
    policy = ResidentWaits(max_resident=10, evict_after=5, settle=0)
    for n in range(10_000):
        policy.wait(f"a{n}", 1, TOKEN, T0 + n)
        policy.due(T0 + n)
        policy.resumed(f"a{n}", [1])
    assert policy.waiting == 0
    aging, victims = policy.heap_sizes
    assert victims < 200 and aging < 200
