"""The passes of a run: a pool of worker processes over the ranges of the NULL rows, watched
by the parent (results, progress, its lease, dead workers, the grace period after a stop)."""

import dataclasses
import gc
import logging
import multiprocessing
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg2

from . import catalog, db, planner
from .errors import EtlError, WorkerDied
from .pool import embed_ranges, init_worker
from .progress import Progress
from .providers import make_embedder
from .shared import FIELDS, SharedState

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.pool import IMapIterator

    from .catalog import Target
    from .driver import _Counts
    from .lease import Lease
    from .planner import Range
    from .ratelimit import RateLimiter
    from .settings import Settings
    from .shape import Shape

log = logging.getLogger(__name__)

GRACE_SECONDS = 7.0  # after SIGINT/SIGTERM, how long in-flight batches may finish
POLL_SECONDS = 0.2  # the parent looks at its pool this often
SWEEPS = 2  # passes after the backlog's for rows that became NULL meanwhile, or that a write left out
CONTINUE, FINISHED, END = "continue", "finished", "end"


class PassWatch:
    """What a pass does next, decided from what the parent sees at each look: the pool's news (None,
    "done", or a worker's one-line error), the workers' shared state, the signals received so far
    and the time. No database and no process: a unit test drives it, as RangeCursor's does."""

    def __init__(
        self, processes: int, grace: float = GRACE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.processes = processes
        self.grace = grace
        self.clock = clock
        self.stop_seen: float | None = None
        self.fatal: EtlError | None = None

    def judge(self, news: str | EtlError | None, shared: SharedState, signals: int) -> str:
        """CONTINUE, FINISHED (every range walked) or END (stop the workers now)."""
        if news == "done":
            return FINISHED
        if isinstance(news, EtlError):
            self.fatal = self.fatal or news
            shared.request_stop(fatal=True)
        if not shared.stopping() and shared.workers_started > self.processes:
            self.fatal = self.fatal or WorkerDied(
                "a worker process died unexpectedly (killed by the OOM killer or a signal?); "
                "its batch was rolled back: rerun to resume"
            )
            shared.request_stop(fatal=True)
        if not shared.stopping():
            return CONTINUE
        # In-flight batches may finish; past the grace period (or at a second Ctrl-C) the workers
        # are terminated (their claims go with the run's lease).
        if self.stop_seen is None:
            self.stop_seen = self.clock()
        waited = self.clock() - self.stop_seen
        dead = shared.workers_started - self.processes
        if dead > 0 and shared.busy_workers() <= dead:
            return END  # the survivors are idle; the dead worker's range never reports back
        if waited > self.grace or signals > 1:
            log.warning("stopping workers that did not finish within %.1f s", waited)
            return END
        return CONTINUE


def _next(results: "IMapIterator[None]") -> str | EtlError | None:
    """The pool's news within POLL_SECONDS: None, "done", or a worker's error."""
    try:
        results.next(timeout=POLL_SECONDS)
    except multiprocessing.TimeoutError:
        return None
    except StopIteration:
        return "done"
    except EtlError as error:
        return error
    return None


class Run:
    """One invocation: its signals, its lease, and its passes of the worker pool over the NULL rows
    (one for the backlog, the sweeps after it; with --follow, one more each time rows need a vector)."""

    def __init__(
        self,
        settings: "Settings",
        target: "Target",
        processes: int,
        context: "BaseContext",
        limiter: "RateLimiter",
        shape: "Shape",
        lease: "Lease",
        identity: Mapping[str, Any],
    ) -> None:
        self.settings = settings
        self.target = target
        self.processes = processes
        self.context = context
        self.limiter = limiter
        self.limiter.start()
        self.shape = shape  # what the run knows of the server (shape.py), kept at the end of each pass
        self.requests = self.context.BoundedSemaphore(settings.workers)  # --workers requests in flight, run-wide
        self.lease = lease
        self.identity = identity
        self.passes = 0
        # One client for every pass's processes, built before any fork and never used here:
        # no connection of it exists to cross the fork, and its pages are shared, not copied.
        self.embedder = make_embedder(settings, target.dimensions)
        self.received: list[int] = []
        self.fatal: EtlError | None = None
        self.shared: SharedState | None = None  # the current pass's
        self.earlier = dict.fromkeys(FIELDS, 0)  # totals of the passes that ended
        self.progress: Progress | None = None
        self.also_tick: Callable[[], None] | None = None  # serve: its other leases, its health

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.shared is not None:
            self.shared.request_stop()

    def totals(self) -> dict[str, int]:
        current = self.shared.totals() if self.shared is not None else {}
        return {name: value + current.get(name, 0) for name, value in self.earlier.items()}

    def embed(self, ranges: list["Range"], counts: "_Counts | None" = None, limit: int | None = None) -> bool:
        """One pass of a fresh pool over `ranges` (at most `limit` rows: serve's share of a column); True
        when it walked them all (no stop, no error). A fresh pool and shared state each pass: nothing
        grows with the passes."""
        settings, processes = self.settings, self.processes
        if self.passes:  # --retry-failed takes the ledger's rows once: a later pass would pay for this run's again
            settings = dataclasses.replace(settings, retry_failed=False)
        self.passes += 1
        shared = self.shared = SharedState(self.context, processes, settings.limit if limit is None else limit)
        if self.received:
            shared.request_stop()
        finished = False
        gc.collect()  # garbage of earlier passes must not be frozen for good
        gc.freeze()  # the workers share the parent's objects: keep the collector from writing to (copying) them
        pool = self.context.Pool(
            processes,
            initializer=init_worker,
            initargs=(
                settings,
                self.target,
                ranges,
                shared,
                self.limiter,
                self.requests,
                self.shape,
                self.embedder,
                self.lease.run_id,
                self.identity,
            ),
        )
        # Threads (the count, tqdm) start only after the fork.
        if self.progress is None:
            self.progress = Progress(sys.stderr, interval=settings.progress_interval, follow=settings.follow)
        watch = PassWatch(processes)
        try:
            results = pool.imap_unordered(embed_ranges, range(processes))
            if counts is not None:
                counts.start()
            total_applied = counts is None
            while True:
                verdict = watch.judge(_next(results), shared, len(self.received))
                if verdict == FINISHED:
                    break
                if counts is not None and counts.ready.is_set() and not total_applied:
                    total_applied = True
                    self.progress.set_total(counts.total())
                    counts.announce()
                self.tick()
                if verdict == END:
                    break
            self.fatal = self.fatal or watch.fatal
            finished = verdict == FINISHED and not shared.stopping()
        finally:
            if finished:
                pool.close()
            else:  # a stop, or an error in this loop: end the workers now, PostgreSQL rolls back their batches
                shared.request_stop(fatal=self.fatal is not None)
                pool.terminate()
            pool.join()
            self.shape.keep(settings.database_url, self.embedder.endpoint, self.embedder.model)
            totals = self.totals()
            self.shared = None  # before `earlier` grows: a reader of totals() (serve's /metrics) never counts twice
            self.earlier = totals
            self.progress.update(self.totals())
        return finished

    def sweep(self) -> int | None:
        """After the backlog: passes over the rows that became NULL meanwhile or that a write left out
        (edited while their request was out, held by the application at the write), while a pass finds
        some and at most SWEEPS; then the rows still NULL that no run is on (None after a stop)."""
        for _ in range(SWEEPS):
            ranges = self._plan_left()
            if not ranges:
                break
            log.info("rows became NULL while the run went, or a write left them out: one more pass")
            before = self.totals()
            if not self.embed(ranges):
                return None
            if self.totals()["embedded"] == before["embedded"]:
                break
        try:
            conn = db.connect(self.settings.database_url)
            try:
                return catalog.count_left(conn, self.target, self.lease.run_id, retry_failed=False)
            finally:
                conn.close()
        except (psycopg2.Error, EtlError) as error:
            log.debug("counting the rows left failed: %s", db.first_line(error))
            return None

    def _plan_left(self) -> list["Range"]:
        """Ranges over the rows to embed that no run is on, or [] when there are none."""
        conn = db.connect(self.settings.database_url)
        try:
            if not catalog.has_rows_to_embed(conn, self.target, False, self.lease.run_id):
                return []
            return planner.plan_ranges(conn, self.target, self.processes, self.settings.batch_size)
        finally:
            conn.close()  # no socket crosses the fork

    def tick(self) -> None:
        """What the parent does between two looks at its pool, never waiting on the database."""
        assert self.progress is not None  # made by the first pass
        self.progress.update(self.totals())
        self.lease.tick()
        if self.also_tick is not None:
            self.also_tick()
