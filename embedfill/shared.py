"""State shared by the parent and the worker processes, in lock-free shared memory where it can be.

Counters are per worker slot: each worker process (single-threaded) is the only writer of
its slot, so a worker killed mid-update can never leave a lock held that the parent waits on.
"""

import bisect
import time
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

# left: rows a write left out for a reason not theirs (edited while the request was out, filled or
# deleted by someone else, held by another transaction): still NULL, for the next pass or run.
# lat0..lat10: requests answered (or failed) within each LATENCY_BUCKETS bound, the last one beyond; latency_ms:
# their sum (serve's /metrics histogram).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_FIELDS = tuple(f"lat{index}" for index in range(len(LATENCY_BUCKETS) + 1))
COUNTS = ("embedded", "failed", "tokens", "requests", "retries", "rate_limited", "truncated", "left", "latency_ms")
FIELDS = (*COUNTS, *LATENCY_FIELDS)

RUNNING, STOPPING, FATAL = 0, 1, 2


class SharedState:
    """Created by the parent before the pool; inherited by each worker through the initializer."""

    def __init__(self, context: "BaseContext", processes: int, limit: int | None = None) -> None:
        self.slots = processes * 2 + 4  # room for the replacements of dead processes
        self._counters = context.RawArray("q", self.slots * len(FIELDS))
        self._stop = context.RawValue("i", RUNNING)
        self._started = context.RawValue("i", 0)  # read by the parent without a lock a dead worker could hold
        self._register = context.Lock()
        self._limit_left = context.Value("q", -1 if limit is None else limit)
        self._busy = context.RawArray("b", self.slots)
        self._next_range = context.Value("i", 0)
        self.slot: int | None = None  # set by register_worker, in the worker

    # --- worker side -------------------------------------------------------------------
    def register_worker(self) -> int:
        """Take a counter slot for this process; returns its 1-based worker number."""
        with self._register:
            self._started.value += 1
            number = self._started.value
        self.slot = min(number, self.slots) - 1
        return number

    def add(self, **amounts: int) -> None:
        base = cast(int, self.slot) * len(FIELDS)
        for name, amount in amounts.items():
            if amount:
                self._counters[base + FIELDS.index(name)] += amount

    def observe_latency(self, seconds: float) -> None:
        """One request's time, from its sending to its answer's last byte (or its failure)."""
        self.add(latency_ms=round(seconds * 1000), **{LATENCY_FIELDS[bisect.bisect_left(LATENCY_BUCKETS, seconds)]: 1})

    def take_range(self) -> int:
        """The index of the next range to walk (past the end when none is left)."""
        with self._next_range.get_lock():
            index = self._next_range.value
            self._next_range.value += 1
            return index

    def set_busy(self, busy: bool) -> None:
        """Mark this worker as inside a range (the parent stops waiting for idle workers)."""
        self._busy[self.slot] = 1 if busy else 0

    def reserve_rows(self, wanted: int) -> int:
        """Rows this worker may still claim under --limit (all of `wanted` without a limit)."""
        with self._limit_left.get_lock():
            left = self._limit_left.value
            if left < 0:
                return wanted
            granted = min(wanted, left)
            self._limit_left.value = left - granted
            return granted

    def release_rows(self, unused: int) -> None:
        if unused > 0:
            with self._limit_left.get_lock():
                if self._limit_left.value >= 0:
                    self._limit_left.value += unused

    # --- both sides ----------------------------------------------------------------------
    def stopping(self) -> bool:
        return self._stop.value != RUNNING

    def request_stop(self, fatal: bool = False) -> None:
        if fatal:
            self._stop.value = FATAL
        elif self._stop.value == RUNNING:
            self._stop.value = STOPPING

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when a stop is requested; True if stopped."""
        deadline = time.monotonic() + seconds
        while not self.stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.1))
        return True

    # --- parent side ---------------------------------------------------------------------
    @property
    def workers_started(self) -> int:
        return self._started.value

    def busy_workers(self) -> int:
        """Workers inside a range now (a dead worker's slot stays busy forever)."""
        return sum(self._busy)

    def totals(self) -> dict[str, int]:
        sums = dict.fromkeys(FIELDS, 0)
        for slot in range(self.slots):
            base = slot * len(FIELDS)
            for index, name in enumerate(FIELDS):
                sums[name] += self._counters[base + index]
        return sums
