"""Time-sortable ids: ``<prefix>_<26 chars>``, 48 bits of milliseconds then 80 random bits in
Crockford base32, monotonic within a process (like ULID)."""

from __future__ import annotations

import base64
import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)
_lock = threading.Lock()
_last = (0, 0)

PREFIXES = frozenset(
    {"run", "batch", "waitpoint", "sched", "queue", "attempt", "evt", "exec", "env", "key"}
)


def new_id(prefix: str) -> str:
    """A new id such as ``run_01jd...``; later calls in one process sort after earlier ones."""
    global _last
    with _lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
        _last = (ms, rand)
    return _encode(prefix, ms, rand)


def random_id(prefix: str) -> str:
    """A new id such as ``attempt_01jd...``: sortable by its millisecond only, with 80 bits of
    fresh randomness, so it cannot be derived from another id (``new_id`` increments within a
    millisecond, and run ids are handed to browsers)."""
    return _encode(prefix, time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10), "big"))


def _encode(prefix: str, ms: int, rand: int) -> str:
    # 48 bits of time and 80 of randomness in 26 base32 digits: the low 130 bits of 160.
    digits = base64.b32encode(((ms << 80) | rand).to_bytes(20, "big"))[6:]
    return f"{prefix}_{digits.decode().translate(_FROM_RFC4648)}"


def has_prefix(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and len(value) == len(prefix) + 27


def timestamp_ms(value: str) -> int:
    """The millisecond an id made by :func:`new_id` or :func:`random_id` was made at."""
    digits = value.rsplit("_", 1)[-1]
    if len(digits) != 26:
        raise ValueError(f"{value[:60]!r} is not a runplane id (<prefix>_<26 characters>)")
    # The first 10 digits are 50 bits: two zero bits, then the 48 bits of milliseconds.
    return int(digits[:10].translate(_TO_RFC4648_ORDER), 32)


# Crockford base32 digits to the 0-9a-v digits int(..., 32) reads.
_TO_RFC4648_ORDER = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
