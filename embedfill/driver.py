"""The driver: checks the table, plans the ranges, runs the worker pool, reports, picks the exit code."""

import dataclasses
import gc
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time

import psycopg2
from psycopg2 import sql

from . import catalog, db, indexes, planner, schema
from .embedders import check_provider, load_client_library, make_embedder
from .errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_SIGTERM, DatabaseError, EtlError, WorkerDied
from .lease import Lease, end_dead_runs
from .models import estimate_cost
from .progress import Progress, format_eta
from .ratelimit import RateLimiter
from .shared import FIELDS, SharedState
from .texts import load_encoding, mean_tokens, row_text
from .worker import embed_ranges, init_worker, process_count

log = logging.getLogger(__name__)

GRACE_SECONDS = 7.0  # after SIGINT/SIGTERM, how long in-flight batches may finish
POLL_SECONDS = 0.2
DEBOUNCE_SECONDS = 1.0  # --follow: after a notification, gather the rest of a burst this long


SWEEPS = 2  # passes after the backlog's for rows that became NULL meanwhile, or that a write left out


def prepare(settings, processes, limiter):
    """Check the table and the server, migrate the tool's tables, take the run's lease (unless
    --dry-run), guard the column and plan the ranges (one short connection).
    Returns (target, ranges, lease or None, what the column's record must say)."""
    conn = db.connect(settings.database_url)
    lease = None
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        catalog.check_connections(conn, settings.workers, processes + 2)  # the workers, the lease, the count
        if not settings.dry_run:
            end_dead_runs(conn)
            lease = Lease(settings, target, limiter)
            lease.renew()  # live before the guard holds the column's record for it, and before any claim
        identity = catalog.guard_column(conn, settings, target, run_id=lease and lease.run_id)
        indexes.prepare(conn, target, settings)
        if not catalog.has_partial_index(conn, target):
            statement, _ = catalog.partial_index_sql(target)
            log.warning(
                "no partial index on %s WHERE %s IS NULL: every claim scans more than it needs. "
                "Create it with: %s (or run `python etl.py init`)%s",
                target.display,
                target.embedding_column,
                statement,
                " (a partitioned table: this locks writes on it while it builds; or create it CONCURRENTLY on "
                "each partition)"
                if target.partitioned
                else "",
            )
        ranges = planner.plan_ranges(conn, target, processes, settings.batch_size)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    finally:
        conn.close()
    return target, ranges, lease, identity


class _Counts:
    """Rows to embed and known failures, counted in the background once the workers run."""

    def __init__(self, settings, target):
        self.settings = settings
        self.target = target
        self.null_rows = None
        self.known_failures = 0
        self.announced = False
        self.ready = threading.Event()

    def start(self):
        threading.Thread(target=self._count, name="count", daemon=True).start()

    def _count(self):
        try:
            conn = db.connect(self.settings.database_url)
            try:
                self.null_rows = catalog.count_null(conn, self.target)
                if not self.settings.retry_failed:
                    self.known_failures = catalog.count_known_failures(conn, self.target)
            finally:
                conn.close()
        except Exception:  # the total only feeds the display
            log.debug("counting the rows to embed failed", exc_info=True)
        self.ready.set()

    def announce(self):
        """Say once that rows of the ledger are skipped."""
        if self.known_failures and not self.announced:
            self.announced = True
            log.info(
                "skipping %d rows recorded in etl_failures (use --retry-failed to take them again)", self.known_failures
            )

    def total(self):
        if self.null_rows is None:
            return None
        total = self.null_rows - self.known_failures
        if self.settings.limit is not None:
            total = min(total, self.settings.limit)
        return max(total, 0)


def run_backfill(settings, out=None):
    """Fill the embedding column (then, with --follow, keep it filled); returns the process exit code."""
    out = out or sys.stdout
    started = time.monotonic()
    processes = process_count(settings.workers)
    importer = None
    if settings.provider != "local":
        check_provider(settings)  # fails fast on a missing key; the real clients live in the workers
        # The SDK takes half a second to import: import it while the database is checked and
        # the ranges planned, before the fork, so that every worker shares it.
        importer = threading.Thread(target=_load_client_library, daemon=True)
        importer.start()
    context = multiprocessing.get_context("fork")
    limiter = RateLimiter(context, settings.rpm, settings.tpm, settings.workers)
    target, ranges, lease, identity = prepare(settings, processes, limiter)
    if importer is not None:
        importer.join()
    if settings.tpm or settings.dry_run:
        load_encoding()  # exact counts needed: load once, before the fork, so every worker shares it
    if settings.dry_run:
        return dry_run(settings, target, ranges, out)

    run = Run(settings, target, processes, context, limiter, lease, identity)
    previous = {sig: signal.signal(sig, run.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    counts = _Counts(settings, target)
    still_null = None
    try:
        finished = run.embed(ranges, counts)
        if finished and settings.follow:
            indexes.restore(settings, target, lease.run_id)  # the backlog is done: search needs it
            run.follow()
        elif finished and settings.limit is None:
            still_null = run.sweep()
    finally:
        run.lease.release()
        run.embedder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run.progress is not None:
            run.progress.update(run.totals(), force_line=True)
            run.progress.close()

    if counts.ready.wait(timeout=2.0):
        counts.announce()
    totals = run.totals()
    elapsed = time.monotonic() - started
    print(summary_line(settings, totals, elapsed, counts.known_failures, still_null), file=out, flush=True)
    if totals["truncated"]:
        log.warning(
            "%d inputs were longer than %d tokens and were truncated before sending",
            totals["truncated"],
            settings.input_token_limit,
        )
    if still_null:
        log.warning(
            "%d rows are still NULL and no run is on them: the application wrote them while this run went "
            "(inserted, or edited while their request was out); rerun, or keep the column filled with --follow",
            still_null,
        )
    if run.fatal is not None or run.received:
        indexes.say_waiting(settings, target)
    if run.fatal is not None:
        raise EtlError(str(run.fatal))
    if not run.received:
        indexes.restore(settings, target)
    if run.received:
        signum = run.received[0]
        log.warning("interrupted by %s: committed batches are kept; rerun to resume", signal.Signals(signum).name)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    if totals["failed"]:
        log.warning(
            "%d rows could not be embedded; each is recorded in etl_failures "
            "(`python etl.py status` shows why; rerun with --retry-failed to try them again)",
            totals["failed"],
        )
        return EXIT_PARTIAL
    return EXIT_OK


class Run:
    """One invocation: its signals, its lease, and its passes of the worker pool over the NULL rows
    (one for the backlog; with --follow, one more each time rows need a vector)."""

    def __init__(self, settings, target, processes, context, limiter, lease, identity):
        self.settings = settings
        self.target = target
        self.processes = processes
        self.context = context
        self.limiter = limiter
        self.limiter.start()
        self.requests = self.context.BoundedSemaphore(settings.workers)  # --workers requests in flight, run-wide
        self.lease = lease
        self.identity = identity
        self.passes = 0
        # One client for every pass's processes, built before any fork and never used here:
        # no connection of it exists to cross the fork, and its pages are shared, not copied.
        self.embedder = make_embedder(settings, target.dimensions)
        self.received = []
        self.fatal = None
        self.shared = None  # the current pass's
        self.earlier = dict.fromkeys(FIELDS, 0)  # totals of the passes that ended
        self.progress = None

    def on_signal(self, signum, frame):
        self.received.append(signum)
        if self.shared is not None:
            self.shared.request_stop()

    def totals(self):
        current = self.shared.totals() if self.shared is not None else {}
        return {name: value + current.get(name, 0) for name, value in self.earlier.items()}

    def embed(self, ranges, counts=None):
        """One pass of a fresh pool over `ranges`; True when it walked them all (no stop, no error).
        A fresh pool and shared state each pass: nothing grows with the passes."""
        settings, processes = self.settings, self.processes
        if self.passes:  # --retry-failed takes the ledger's rows once: a later pass would pay for this run's again
            settings = dataclasses.replace(settings, retry_failed=False)
        self.passes += 1
        shared = self.shared = SharedState(self.context, processes, settings.limit)
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
                self.embedder,
                self.lease.run_id,
                self.identity,
            ),
        )
        # Threads (the count, tqdm) start only after the fork.
        if self.progress is None:
            interval = settings.progress_interval
            self.progress = Progress(sys.stderr, interval=interval, follow=settings.follow)
        try:
            results = pool.imap_unordered(embed_ranges, range(processes))
            if counts is not None:
                counts.start()
            stop_seen = None
            total_applied = counts is None
            while True:
                try:
                    results.next(timeout=POLL_SECONDS)
                except multiprocessing.TimeoutError:
                    pass
                except StopIteration:
                    finished = True
                    break
                except EtlError as error:
                    self.fatal = self.fatal or error
                    shared.request_stop(fatal=True)
                if counts is not None and counts.ready.is_set() and not total_applied:
                    total_applied = True
                    self.progress.set_total(counts.total())
                    counts.announce()
                self.progress.update(self.totals())
                self.lease.tick()
                if not shared.stopping() and shared.workers_started > processes:
                    self.fatal = WorkerDied(
                        "a worker process died unexpectedly (killed by the OOM killer or a signal?); "
                        "its batch was rolled back: rerun to resume"
                    )
                    shared.request_stop(fatal=True)
                if shared.stopping():
                    # In-flight batches may finish; past the grace period (or at a second Ctrl-C)
                    # the workers are terminated and PostgreSQL rolls their batches back.
                    stop_seen = stop_seen or time.monotonic()
                    waited = time.monotonic() - stop_seen
                    dead = shared.workers_started - processes
                    if dead > 0 and shared.busy_workers() <= dead:
                        break  # the survivors are idle; the dead worker's range never reports back
                    if waited > GRACE_SECONDS or len(self.received) > 1:
                        log.warning(
                            "stopping workers that did not finish within %.1f s; their batches roll back", waited
                        )
                        break
            finished = finished and not shared.stopping()
        finally:
            if finished:
                pool.close()
            else:  # a stop, or an error in this loop: end the workers now, PostgreSQL rolls back their batches
                shared.request_stop(fatal=self.fatal is not None)
                pool.terminate()
            pool.join()
            self.earlier = self.totals()
            self.shared = None
            self.progress.update(self.totals())
        return finished

    def sweep(self):
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

    def _plan_left(self):
        """Ranges over the rows to embed that no run is on, or [] when there are none."""
        conn = db.connect(self.settings.database_url)
        try:
            if not catalog.has_rows_to_embed(conn, self.target, False, self.lease.run_id):
                return []
            return planner.plan_ranges(conn, self.target, self.processes, self.settings.batch_size)
        finally:
            conn.close()  # no socket crosses the fork

    # --- --follow --------------------------------------------------------------------------------
    def follow(self):
        """After the backlog: sleep on LISTEN (and a poll every --poll-seconds), then embed the rows
        that need a vector in another pass; until a signal or a fatal error."""
        if self.progress is not None:
            self.progress.set_total(None)
        log.info(
            "backlog done; following %s (LISTEN, and a look every %g s)",
            self.target.display,
            self.settings.poll_seconds,
        )
        listener, look = None, True
        while not self.received and self.fatal is None:
            try:
                listener = listener or self._listen()
                if listener is None:
                    break
                if look and catalog.has_rows_to_embed(listener, self.target, False, self.lease.run_id):
                    ranges = planner.plan_ranges(listener, self.target, self.processes, self.settings.batch_size)
                    log.debug("rows to embed: a pass over %d ranges", len(ranges))
                    listener.close()  # no socket crosses the fork
                    listener = None
                    self.lease.close()
                    before = self.totals()
                    self.limiter["last_success"] = time.monotonic()  # an idle spell is no 429 stall
                    if not self.embed(ranges):
                        return
                    # A pass that took nothing (rows locked by another run) waits before looking again.
                    after = self.totals()
                    look = after["embedded"] + after["failed"] > before["embedded"] + before["failed"]
                    continue
                self._wait(listener)
                look = True
            except (psycopg2.Error, DatabaseError) as error:
                log.warning("lost the database connection while following: %s", db.first_line(error))
                if listener is not None:
                    listener.close()
                listener = None
                if self._idle(1.0):
                    break
        if listener is not None:
            listener.close()

    def _listen(self):
        """A connection LISTENing on the table's channel, waiting up to --reconnect-seconds for the
        database; None after a signal or when the database stayed away (then `fatal` says so)."""
        window = self.settings.reconnect_seconds
        deadline = time.monotonic() + window
        # w0: `status` counts the follower as an active run while it waits (sql/status_active.sql)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:r{os.getpid()}w0"
        channel = catalog.tracking_name(self.target)[1]
        while True:
            conn = None
            try:
                conn = db.connect(self.settings.database_url, application_name=name)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                return conn
            except (psycopg2.Error, DatabaseError) as error:
                if conn is not None:
                    conn.close()
                if time.monotonic() > deadline:
                    self.fatal = DatabaseError(
                        f"lost the database connection and could not reconnect within {window:.0f} s "
                        f"({db.first_line(error)}); check the server, then rerun"
                    )
                    return None
            if self._idle(1.0):
                return None

    def _wait(self, conn):
        """Until a notification (then DEBOUNCE_SECONDS more, so that a burst of edits becomes
        full batches), --poll-seconds, or a signal."""
        deadline = time.monotonic() + self.settings.poll_seconds
        woken = time.monotonic() if conn.notifies else None
        while not self.received:
            now = time.monotonic()
            end = min(deadline, woken + DEBOUNCE_SECONDS) if woken else deadline
            if now >= end:
                break
            self._tick()
            if select.select([conn], [], [], min(0.5, end - now))[0]:
                conn.poll()
            if conn.notifies:
                conn.notifies.clear()
                woken = woken or time.monotonic()

    def _idle(self, seconds):
        """Sleep up to `seconds`, keeping the lease and the progress lines; True on a signal."""
        deadline = time.monotonic() + seconds
        while not self.received and time.monotonic() < deadline:
            self._tick()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return bool(self.received)

    def _tick(self):
        self.lease.tick()
        self.progress.update(self.totals())


def _load_client_library():
    try:
        load_client_library()
    except Exception:  # each worker then imports it itself and reports any error
        log.debug("loading the API client library before the fork failed", exc_info=True)


def summary_line(settings, totals, elapsed, skipped, still_null=None):
    """The parseable summary: what the database holds now, counted from RETURNING, not from what was sent."""
    rate = (totals["embedded"] + totals["failed"]) / elapsed if elapsed > 0 else 0.0
    cost = estimate_cost(settings.model_name, totals["tokens"], settings.price, batch=settings.batch_api)
    return (
        f"summary embedded={totals['embedded']} failed={totals['failed']} skipped_known_failures={skipped} "
        f"elapsed_s={elapsed:.1f} rows_per_s={rate:.1f} tokens={totals['tokens']} "
        f"cost_usd={'unknown' if cost is None else f'{cost:.4f}'} requests={totals['requests']} "
        f"retries={totals['retries']} rate_limited={totals['rate_limited']} truncated={totals['truncated']}"
        + ("" if still_null is None else f" still_null={still_null}")
        + (" batch_api=yes" if settings.batch_api else "")
    )


def dry_run(settings, target, ranges, out):
    """Plan without calling the API: rows, tokens, cost, time at the rate limits, ranges."""
    conn = db.connect(settings.database_url)
    try:
        null_rows = catalog.count_null(conn, target)
        known = 0 if settings.retry_failed else catalog.count_known_failures(conn, target)
        with conn.cursor() as cur:
            cur.execute(target.query("sample_texts"), {"limit": 1000})
            samples = cur.fetchall()
        conn.rollback()
    finally:
        conn.close()
    rows = max(0, null_rows - known)
    if settings.limit is not None:
        rows = min(rows, settings.limit)
    mean = mean_tokens((row_text(values) for values in samples), settings.input_token_limit)
    tokens = int(mean * rows)
    cost = estimate_cost(settings.model_name, tokens, settings.price, batch=settings.batch_api)
    minutes = []
    if settings.tpm:
        minutes.append(tokens / settings.tpm)
    if settings.rpm:
        minutes.append(rows / settings.batch_size / settings.rpm)
    print(
        f"dry-run table={target.display} rows_to_embed={rows} skipped_known_failures={known} "
        f"estimated_tokens={tokens} tokens_per_row={mean:.1f} sample_rows={len(samples)} "
        f"estimated_cost_usd={'unknown' if cost is None else f'{cost:.4f}'} "
        f"estimated_time={format_eta(max(minutes) * 60) if minutes else 'unbounded (no ETL_TPM or ETL_RPM set)'} "
        f"model={settings.model_name} workers={settings.workers} batch_size={settings.batch_size} "
        f"ranges={len(ranges)}" + (" batch_api=yes" if settings.batch_api else ""),
        file=out,
    )
    processes = process_count(settings.workers)
    print(
        f"ranges: processes w1..w{processes} take ranges 1..{min(processes, len(ranges))} first, then each free "
        "one takes the next; ranges shrink toward the end so that they finish together",
        file=out,
    )
    for index, (after, upto) in enumerate(ranges):
        low = "(start" if after is None else f"({after}"
        high = "end)" if upto is None else f"{upto}]"
        print(f"range {index + 1}: {low}, {high}", file=out)
    return EXIT_OK
