"""The back-off formula: min(max_timeout, r * min_timeout * factor**(n-1)), r in [1, 2)."""

from __future__ import annotations

import pytest

from runplane_scheduler.retry import MAX_ATTEMPTS_CAP, RetryPolicy, retry_delay, should_retry


def test_defaults_match_the_reference() -> None:
    p = RetryPolicy()
    assert (p.max_attempts, p.factor, p.min_timeout, p.max_timeout, p.randomize) == (
        3,
        2.0,
        1.0,
        60.0,
        True,
    )


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (20, 60.0)],
)
def test_delay_without_randomness(attempt: int, expected: float) -> None:
    policy = RetryPolicy(randomize=False)
    assert retry_delay(policy, attempt) == expected


def test_randomized_delay_is_between_one_and_two_times() -> None:
    policy = RetryPolicy(min_timeout=1.5, factor=3, max_timeout=1000)
    assert retry_delay(policy, 2, rand=lambda: 0.0) == pytest.approx(4.5)
    assert retry_delay(policy, 2, rand=lambda: 0.999) == pytest.approx(1.999 * 4.5)
    assert retry_delay(policy, 2, rand=lambda: 0.5) == pytest.approx(6.75)


def test_randomized_delay_is_capped() -> None:
    policy = RetryPolicy(min_timeout=10, max_timeout=15)
    assert retry_delay(policy, 1, rand=lambda: 0.9) == 15


def test_should_retry() -> None:
    assert should_retry(3, 1, skip_retrying=False)
    assert should_retry(3, 2, skip_retrying=False)
    assert not should_retry(3, 3, skip_retrying=False)
    assert not should_retry(3, 1, skip_retrying=True)
    assert not should_retry(1000, MAX_ATTEMPTS_CAP, skip_retrying=False)
    assert should_retry(1000, MAX_ATTEMPTS_CAP - 1, skip_retrying=False)
