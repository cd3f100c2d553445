"""In-memory dispatch index: queued runs per queue, slots, executors and leases.

The database is the truth; this index makes the hot path fast. It is rebuilt from the database
when the scheduler starts. Pure data structures, no IO.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from runplane_scheduler.worker_messages import ToExecutor

QueueName = tuple[str, str]  # (environment_id, queue name)
# A queue, or one concurrency key's copy of it: (environment_id, queue name, concurrency key).
QueueKey = tuple[str, str, str]


@dataclass(order=True)
class QueuedRun:
    sort_key: int  # queued_at - priority, ms
    seq: int
    run_id: str = field(compare=False)
    task_id: str = field(compare=False)
    # The worker version the run is locked to ('': any executor of the task).
    version: str = field(default="", compare=False)


@dataclass
class QueueConfig:
    """A queue's settings, shared by its per-concurrency-key copies."""

    limit: int = 0  # declared in code; 0: only the environment limit applies
    override: int | None = None
    paused: bool = False
    # At most rate_limit starts per rate_period seconds (0: no rate limit).
    rate_limit: int = 0
    rate_period: float = 0.0
    # Cap across all concurrency keys together (0: none).
    total_limit: int = 0
    running_total: int = 0
    starts: deque[float] = field(default_factory=deque)

    @property
    def effective_limit(self) -> int:
        return self.limit if self.override is None else self.override

    def may_start(self, now: float) -> bool:
        """Not paused, under the cross-key cap, and a start left in the rate window."""
        if self.paused or (self.total_limit and self.running_total >= self.total_limit):
            return False
        if self.rate_limit:
            while self.starts and self.starts[0] <= now - self.rate_period:
                self.starts.popleft()
            return len(self.starts) < self.rate_limit
        return True

    def started(self, now: float) -> None:
        self.running_total += 1
        if self.rate_limit:
            self.starts.append(now)

    def rate_window_opens(self) -> float | None:
        """When a rate-limited queue with a full window may start again."""
        if self.rate_limit and len(self.starts) >= self.rate_limit:
            return self.starts[0] + self.rate_period
        return None


@dataclass
class QueueState:
    """The runs waiting in one queue (or one concurrency key's copy of it) and its slots."""

    key: QueueKey
    config: QueueConfig
    running: int = 0
    heap: list[QueuedRun] = field(default_factory=list)

    def has_slot(self, now: float) -> bool:
        if not self.config.may_start(now):
            return False
        limit = self.config.effective_limit
        return limit <= 0 or self.running < limit


@dataclass(frozen=True)
class Reserved:
    """A slot on an executor held for a run between its pick and its attempt's lease."""

    run_id: str


@dataclass
class ExecutorState:
    executor_id: str
    environment_id: str
    tasks: frozenset[str]
    capacity: int
    outbox: asyncio.Queue[ToExecutor]  # owned by the stream handler
    last_seen: float
    connected: bool = True
    draining: bool = False
    # Leased attempt ids, and the slots reserved for runs about to get one.
    attempts: set[str | Reserved] = field(default_factory=set)
    # Given to the executor on registration: only its holder may register this id again.
    session_token: str = ""
    # The worker version of its code: it runs only runs locked to that version (or to none).
    version: str = ""

    def free(self) -> int:
        return self.capacity - len(self.attempts) if self.connected and not self.draining else 0


@dataclass
class Lease:
    attempt_id: str
    run_id: str
    queue: QueueKey
    executor_id: str
    assigned_at: float
    started: bool = False
    acked: bool = False
    lapsing: bool = False


class DispatchIndex:
    """Queues with their waiting runs, slot counts, executors and attempt leases."""

    def __init__(
        self, environment_limit: int, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.environment_limit = environment_limit
        self.monotonic = monotonic  # the clock of rate windows
        self.configs: dict[QueueName, QueueConfig] = {}
        self._rate_limited: dict[QueueName, QueueConfig] = {}
        self.queues: dict[QueueKey, QueueState] = {}
        # Runs that left QUEUED some other way (cancelled, expired): skipped when reached.
        self.removed: set[str] = set()
        self.env_running: dict[str, int] = {}
        self.executors: dict[str, ExecutorState] = {}
        self.leases: dict[str, Lease] = {}
        self._seq = itertools.count()
        self._rotation: deque[QueueKey] = deque()
        # Decides whether a queue's head, locked to a version no connected executor runs, leaves
        # the queue (to PENDING_VERSION) rather than hold back the runs behind it; None: never.
        # Called with (environment id, task id, version).
        self.strands: Callable[[str, str, str], bool] | None = None
        # Heads taken off their queues that way since the last take(), for the engine to park.
        self.stranded: list[tuple[QueuedRun, QueueKey]] = []

    def config(self, name: QueueName) -> QueueConfig:
        config = self.configs.get(name)
        if config is None:
            config = self.configs[name] = QueueConfig()
        return config

    def queue(self, key: QueueKey) -> QueueState:
        state = self.queues.get(key)
        if state is None:
            state = self.queues[key] = QueueState(key, self.config((key[0], key[1])))
            self._rotation.append(key)
        return state

    def set_rate_limit(self, name: QueueName, limit: int, period: float) -> None:
        config = self.config(name)
        config.rate_limit, config.rate_period = limit, period
        if limit:
            self._rate_limited[name] = config
        else:
            self._rate_limited.pop(name, None)

    def next_wake(self) -> float | None:
        """The monotonic time a rate-limited queue's window reopens, if one is full (only
        rate-limited queues are looked at: this runs on every dispatch round)."""
        times = [t for c in self._rate_limited.values() if (t := c.rate_window_opens()) is not None]
        return min(times, default=None)

    def discard(self, run_id: str) -> None:
        """Forget a queued run that will not be dispatched (its heap entry is dropped lazily)."""
        self.removed.add(run_id)

    def _forget(self, key: QueueKey) -> None:
        """Drop an idle concurrency-key copy, so many one-off keys don't grow the index."""
        del self.queues[key]
        self._rotation.remove(key)

    def push(
        self,
        key: QueueKey,
        run_id: str,
        task_id: str,
        queued_at: int,
        priority: int,
        version: str = "",
    ) -> None:
        heapq.heappush(
            self.queue(key).heap,
            QueuedRun(queued_at - priority * 1000, next(self._seq), run_id, task_id, version),
        )

    def executor_for(
        self, environment_id: str, task_id: str, version: str = ""
    ) -> ExecutorState | None:
        """The executor with the most free slots that runs ``task_id`` at ``version`` (any
        version when '')."""
        best: ExecutorState | None = None
        for ex in self.executors.values():
            usable = (
                ex.environment_id == environment_id
                and task_id in ex.tasks
                and (not version or ex.version == version)
                and ex.free() > 0
            )
            if usable and (best is None or ex.free() > best.free()):
                best = ex
        return best

    def provides(self, environment_id: str, task_id: str, version: str = "") -> bool:
        """A connected executor runs ``task_id`` at ``version`` (any version when '')."""
        return any(
            ex.connected
            and ex.environment_id == environment_id
            and task_id in ex.tasks
            and (not version or ex.version == version)
            for ex in self.executors.values()
        )

    def take(self) -> list[tuple[QueuedRun, QueueKey, ExecutorState]]:
        """Runs to dispatch now, fairly across queues (one per queue per round), reserving their
        slots. Runs whose task no executor can take right now stay queued, except a head that
        :attr:`strands` says to set aside (it goes to :attr:`stranded`)."""
        picked: list[tuple[QueuedRun, QueueKey, ExecutorState]] = []
        now = self.monotonic()
        progress = True
        while progress:
            progress = False
            for _ in range(len(self._rotation)):
                key = self._rotation[0]
                self._rotation.rotate(-1)
                q = self.queues[key]
                env = key[0]
                while q.heap and q.heap[0].run_id in self.removed:
                    self.removed.discard(heapq.heappop(q.heap).run_id)
                if not q.heap:
                    if key[2] and q.running == 0:
                        self._forget(key)
                    continue
                if not q.has_slot(now):
                    continue
                if self.env_running.get(env, 0) >= self.environment_limit:
                    continue
                head = q.heap[0]
                ex = self.executor_for(env, head.task_id, head.version)
                if ex is None:
                    if self._strand(env, head):
                        self.stranded.append((heapq.heappop(q.heap), key))
                        progress = True
                    continue
                heapq.heappop(q.heap)
                q.running += 1
                q.config.started(now)
                self.env_running[env] = self.env_running.get(env, 0) + 1
                ex.attempts.add(Reserved(head.run_id))
                picked.append((head, key, ex))
                progress = True
        return picked

    def requeue(self, queued: QueuedRun, key: QueueKey) -> None:
        """Put a run taken off its queue back in its old place."""
        heapq.heappush(self.queue(key).heap, queued)

    def _strand(self, environment_id: str, head: QueuedRun) -> bool:
        return (
            self.strands is not None
            and bool(head.version)
            and not self.provides(environment_id, head.task_id, head.version)
            and self.strands(environment_id, head.task_id, head.version)
        )

    def reserve_direct(
        self, key: QueueKey, task_id: str, run_id: str, version: str = ""
    ) -> ExecutorState | None:
        """Reserve a slot and an executor for a new run, if nothing waits ahead of it."""
        q = self.queue(key)
        env = key[0]
        now = self.monotonic()
        if q.heap or not q.has_slot(now) or self.env_running.get(env, 0) >= self.environment_limit:
            return None
        ex = self.executor_for(env, task_id, version)
        if ex is None:
            return None
        q.running += 1
        q.config.started(now)
        self.env_running[env] = self.env_running.get(env, 0) + 1
        ex.attempts.add(Reserved(run_id))
        return ex

    def unreserve(self, run_id: str, key: QueueKey, ex: ExecutorState) -> None:
        ex.attempts.discard(Reserved(run_id))
        self._release_slot(key)

    def lease(self, lease: Lease, ex: ExecutorState, holder: ExecutorState | None = None) -> None:
        """The run's reserved slot on ``ex`` becomes its attempt's lease, held by ``holder``
        (default ``ex``; another executor when a suspended attempt resumes where it waits)."""
        ex.attempts.discard(Reserved(lease.run_id))
        (holder or ex).attempts.add(lease.attempt_id)
        self.leases[lease.attempt_id] = lease

    def attempt_of(self, run_id: str) -> str | None:
        """The run's leased attempt, if it has one."""
        for lease in self.leases.values():
            if lease.run_id == run_id:
                return lease.attempt_id
        return None

    def adopt(self, lease: Lease) -> None:
        """A lease found in the database after a restart: its slot is taken."""
        q = self.queue(lease.queue)
        q.running += 1
        q.config.running_total += 1
        env = lease.queue[0]
        self.env_running[env] = self.env_running.get(env, 0) + 1
        self.leases[lease.attempt_id] = lease
        ex = self.executors.get(lease.executor_id)
        if ex is not None:
            ex.attempts.add(lease.attempt_id)

    def release(self, attempt_id: str) -> Lease | None:
        """Drop a lease and free its slot."""
        lease = self.leases.pop(attempt_id, None)
        if lease is None:
            return None
        ex = self.executors.get(lease.executor_id)
        if ex is not None:
            ex.attempts.discard(attempt_id)
        self._release_slot(lease.queue)
        return lease

    def _release_slot(self, key: QueueKey) -> None:
        q = self.queues.get(key)
        if q is not None and q.running > 0:
            q.running -= 1
        config = self.configs.get((key[0], key[1]))
        if config is not None and config.running_total > 0:
            config.running_total -= 1
        env = key[0]
        if self.env_running.get(env, 0) > 0:
            self.env_running[env] -= 1
