"""The executor's side of waits: a task process's wait as a stream message, a Resume's results as
the pipe carries them (the task process side is :class:`runplane.worker.AttemptWaiter`).

:class:`ResidentWaits` is the executor's eviction policy: which waiting attempts stay suspended in
memory and which are dropped, to be replayed from the journal when their waits complete.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from runplane.v1 import worker_service_pb2 as wpb
from runplane.worker import WaitRequest, WaitResult


def wait_request(attempt_id: str, seq: int, request: WaitRequest) -> wpb.WaitRequest:
    """The stream message of a task process's wait."""
    out = wpb.WaitRequest(
        attempt_id=attempt_id,
        seq=seq,
        idempotency_key=request.get("idempotency_key", ""),
        idempotency_key_ttl_ms=request.get("idempotency_key_ttl_ms", 0),
        traceparent=request.get("traceparent", ""),
    )
    if "duration_ms" in request:
        out.duration_ms = request["duration_ms"]
    elif "until_ms" in request:
        out.until_ms = request["until_ms"]
    elif "token_id" in request:
        out.token_id = request["token_id"]
    else:
        for item in request["children"]:
            out.children.items.add().ParseFromString(item)
    return out


def resume_results(resume: wpb.Resume) -> list[WaitResult]:
    """A Resume's results as the pipe carries them."""
    return [
        WaitResult(
            r.seq,
            r.ok,
            r.output,
            {"type": r.error.type, "message": r.error.message, "stack_trace": r.error.stack_trace}
            if r.HasField("error")
            else None,
        )
        for r in resume.results
    ]


# A wait counts as resident (and may be evicted) once it has lasted this long unanswered: by then
# the scheduler has journaled it and the run is WAITING. A wait it answers at once (from the
# journal of a replay, or already complete) is answered well within it.
SETTLE_SECONDS = 1.0


def expected_end(request: WaitRequest, now: float) -> float | None:
    """When a wait should end (epoch seconds), or None when nobody knows (a token, child runs)."""
    if "duration_ms" in request:
        return now + float(request["duration_ms"]) / 1000
    if "until_ms" in request:
        return float(request["until_ms"]) / 1000
    return None


@dataclass
class _Waiting:
    episode: int
    since: float  # when the attempt began to wait (its first pending wait)
    pending: dict[int, float | None] = field(default_factory=dict)  # seq -> expected end
    settled: bool = False
    version: int = 0  # bumped on every change; heap entries of older versions are stale

    def end(self) -> float | None:
        ends = list(self.pending.values())
        if any(e is None for e in ends):
            return None
        return max(e for e in ends if e is not None)


class ResidentWaits:
    """Which waiting attempts an executor keeps suspended in memory. Pure: the caller passes the
    clock (epoch seconds) and carries out the evictions that :meth:`due` returns.

    A waiting attempt is *resident* once its wait has settled (lasted ``settle`` seconds without
    an answer). A resident attempt is evicted:

    - a duration (or ``until``) wait expected to end more than ``evict_after`` seconds later:
      as soon as it settles;
    - a token or child-run wait (its end unknown): once it has lasted ``evict_after``;
    - whenever more than ``max_resident`` attempts are resident: the ones expected to resume
      last go first (unknown ends before known ones, the longest-waiting of those first; then
      the latest end first).

    Short duration waits stay resident (no replay for a 1 s wait). 0 turns a rule off.
    """

    def __init__(
        self, max_resident: int, evict_after: float, settle: float = SETTLE_SECONDS
    ) -> None:
        self.max_resident = max(0, max_resident)
        self.evict_after = max(0.0, evict_after)
        self.settle = settle
        self._waiting: dict[str, _Waiting] = {}
        self._episodes = itertools.count()
        self._settling: deque[tuple[float, str, int]] = deque()  # (settles at, attempt, episode)
        self._aging: list[tuple[float, str, int]] = []  # heap: (evict at, attempt, version)
        self._victims: list[tuple[tuple[int, float], str, int]] = []  # heap: (key, id, version)
        self.resident = 0  # settled waiting attempts kept in memory
        self.high_water = 0  # the most ever resident after an eviction decision
        self.evicted = 0  # attempts evicted so far

    @property
    def enabled(self) -> bool:
        return bool(self.max_resident or self.evict_after)

    @property
    def waiting(self) -> int:
        """Waiting attempts in memory, settled or not."""
        return len(self._waiting)

    @property
    def heap_sizes(self) -> tuple[int, int]:
        """Entries in the two eviction heaps (aging, victims), stale ones included: bounded."""
        return len(self._aging), len(self._victims)

    def wait(self, attempt_id: str, seq: int, request: WaitRequest, now: float) -> None:
        """The attempt sent wait ``seq``."""
        w = self._waiting.get(attempt_id)
        if w is None:
            w = _Waiting(next(self._episodes), now)
            self._waiting[attempt_id] = w
            self._settling.append((now + self.settle, attempt_id, w.episode))
        w.pending[seq] = expected_end(request, now)
        if w.settled:
            self._changed(attempt_id, w)

    def resumed(self, attempt_id: str, seqs: Iterable[int]) -> None:
        """The executor handed the attempt these waits' results."""
        w = self._waiting.get(attempt_id)
        if w is None:
            return
        for seq in seqs:
            w.pending.pop(seq, None)
        if not w.pending:
            self.ended(attempt_id)
        elif w.settled:
            self._changed(attempt_id, w)

    def ended(self, attempt_id: str) -> None:
        """The attempt no longer waits here (resumed, finished, or evicted)."""
        w = self._waiting.pop(attempt_id, None)
        if w is not None and w.settled:
            self.resident -= 1

    def due(self, now: float) -> list[str]:
        """The attempts to evict now; they are forgotten here."""
        out: list[str] = []
        while self._settling and self._settling[0][0] <= now:
            _, attempt_id, episode = self._settling.popleft()
            w = self._waiting.get(attempt_id)
            if w is None or w.episode != episode:
                continue
            w.settled = True
            self.resident += 1
            self._changed(attempt_id, w)
            end = w.end()
            if self.evict_after and end is not None and end - now > self.evict_after:
                self._evict(attempt_id, out)
        while self._aging and self._aging[0][0] <= now:
            _, attempt_id, version = heapq.heappop(self._aging)
            w = self._waiting.get(attempt_id)
            if w is not None and w.version == version:
                self._evict(attempt_id, out)
        while self.max_resident and self.resident > self.max_resident and self._victims:
            _, attempt_id, version = heapq.heappop(self._victims)
            w = self._waiting.get(attempt_id)
            if w is not None and w.version == version:
                self._evict(attempt_id, out)
        self.high_water = max(self.high_water, self.resident)
        self._compact()
        return out

    def next_check(self) -> float | None:
        """When :meth:`due` may have something to evict next, if no other event comes first."""
        times = []
        if self._settling:
            times.append(self._settling[0][0])
        if self._aging:
            times.append(self._aging[0][0])
        return min(times) if times else None

    def _changed(self, attempt_id: str, w: _Waiting) -> None:
        w.version += 1
        end = w.end()
        key = (0, w.since) if end is None else (1, -end)
        heapq.heappush(self._victims, (key, attempt_id, w.version))
        if end is None and self.evict_after:
            heapq.heappush(self._aging, (w.since + self.evict_after, attempt_id, w.version))

    def _evict(self, attempt_id: str, out: list[str]) -> None:
        self.ended(attempt_id)
        self.evicted += 1
        out.append(attempt_id)

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones (memory stays bounded)."""
        limit = 2 * len(self._waiting) + 64
        if len(self._victims) > limit:
            self._victims = [e for e in self._victims if self._live(e[1], e[2])]
            heapq.heapify(self._victims)
        if len(self._aging) > limit:
            self._aging = [e for e in self._aging if self._live(e[1], e[2])]
            heapq.heapify(self._aging)

    def _live(self, attempt_id: str, version: int) -> bool:
        w = self._waiting.get(attempt_id)
        return w is not None and w.version == version
