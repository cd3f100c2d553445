"""Retry policy and back-off, as pure functions (SPEC §2, reference §1.2)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MAX_ATTEMPTS_CAP = 250


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    factor: float = 2.0
    min_timeout: float = 1.0
    max_timeout: float = 60.0
    randomize: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def retry_delay(
    policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based):
    ``min(max_timeout, r * min_timeout * factor**(attempt-1))`` with r in [1, 2) when randomized."""
    r = 1.0 + rand() if policy.randomize else 1.0
    return float(min(policy.max_timeout, r * policy.min_timeout * policy.factor ** (attempt - 1)))


def should_retry(policy_max_attempts: int, attempt: int, skip_retrying: bool) -> bool:
    """Whether a failed attempt ``attempt`` (1-based) gets another one."""
    return not skip_retrying and attempt < min(policy_max_attempts, MAX_ATTEMPTS_CAP)
