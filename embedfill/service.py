"""`serve`: one long-running process keeps every tracked column of the database filled (tracked.py
says which), with one pool of --workers requests in flight that the columns with work share fairly.

One loop, in the parent: it sleeps on LISTEN (every tracked column's channel, on one connection)
and looks every --poll-seconds; then, round robin over the columns with rows to embed, it gives each
a slice: one pass of the worker pool (passes.Run: claims, the model guard, the failure ledger,
reconnects, as for any run) of at most the rows the column's last pass embedded in SLICE_SECONDS,
so that a backlog holds the other columns back by one slice at most. The columns of one API key
share one lease and one rate limiter: one quota, divided with the other runs and serve processes on
that key through PostgreSQL as runs divide it. The tracked columns are looked up again every
--poll-seconds. /healthz and /metrics (metrics.py) answer from a thread that reads what this loop
and the workers' counters say, never the database."""

import dataclasses
import logging
import math
import multiprocessing
import select
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import psycopg2
from psycopg2 import sql

from . import catalog, db, driver, logs, planner, schema, tracked
from .errors import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, DatabaseGone, EtlError
from .follow import DEBOUNCE_SECONDS
from .guard import describe_identity
from .lease import SERVE_TABLES, Lease, end_dead_runs
from .passes import Run
from .progress import Progress
from .providers import make_provider
from .ratelimit import RateLimiter
from .shape import Shape
from .texts import load_encoding
from .worker import process_count

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

SLICE_SECONDS = 5.0  # a column's pass, when others wait: about this long
PARK_SECONDS = 60.0  # a column whose pass stopped on an error is left this long before the next
HEALTH_SECONDS = 10.0  # /healthz: the database answered, and the loop turned, within this
SAY_SECONDS = 60.0  # a line per column that embedded something, this often
LOOK_TIMEOUT = "5s"  # the loop's own queries (discovery, probes, counts) never hold it longer


class Column:
    """One kept column: its settings, its Run (passes of the pool), what the loop knows of its backlog."""

    def __init__(self, kept: tracked.Kept, run: Run, processes: int) -> None:
        assert kept.settings is not None and kept.target is not None
        self.name, self.settings, self.target, self.run = kept.name, kept.settings, kept.target, run
        self.channel = catalog.tracking_name(kept.target)[1]
        self.dirty = True  # rows may wait: look
        self.slice = processes * kept.settings.batch_size * 2  # the first pass is short: its rate sets the next
        self.parked_until = 0.0
        self.waiting: int | None = None  # rows NULL at the last count
        self.waiting_since: float | None = None  # since when rows wait (the last time none did, as seen here)
        self.said: dict[str, int] = {}

    def counted(self, waiting: int) -> None:
        self.waiting = waiting
        if not waiting:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = time.monotonic()


class Service:
    """The serve loop: its columns, its leases and limiters (one per API key), its LISTEN connection."""

    def __init__(self, settings: "Settings") -> None:
        self.settings = settings
        self.processes = process_count(settings.workers)
        self.context = multiprocessing.get_context("fork")
        self.received: list[int] = []
        self.columns: dict[str, Column] = {}
        self.alone: dict[str, str] = {}  # columns left alone, and why (said once)
        self.keys: dict[str, tuple[RateLimiter, Lease]] = {}  # API key (its quota key) -> limiter, lease
        self.shapes: dict[tuple[str, str], Shape] = {}  # (endpoint, model) -> what its answers taught
        self.listener: db.Connection | None = None
        self.listening: set[str] = set()
        self.looked_at = -math.inf
        self.turn = 0  # round robin: where the next round starts
        self.beat = self.db_seen = time.monotonic()
        self.said_at = time.monotonic()
        self.lost = False  # the database is away (said once)
        self.current: Column | None = None

    # --- lifetime --------------------------------------------------------------------------------
    def serve(self) -> int:
        """Until SIGTERM or SIGINT (then in-flight batches finish within the grace period): 143 or 130."""
        from . import metrics

        conn = db.connect(self.settings.database_url)
        try:
            schema.ensure(conn)
            end_dead_runs(conn)
        finally:
            conn.close()
        if self.settings.tpm:
            load_encoding()  # exact counts for the budget: once, before any fork
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        http = metrics.start(self, self.settings.http) if self.settings.http else None
        log.info(
            "serving the tracked columns of %s: %d requests in flight at most, a look every %g s%s",
            db.describe_url(self.settings.database_url),
            self.settings.workers,
            self.settings.poll_seconds,
            f"; /healthz and /metrics on http://{self.settings.http}" if http else "",
        )
        try:
            self.loop()
        finally:
            self._close_listener()
            for column in self.columns.values():
                column.run.embedder.close()
            for _, lease in self.keys.values():
                lease.release()
            if http is not None:
                http.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        signum = self.received[0]
        log.warning("stopped by %s: committed batches are kept", signal.Signals(signum).name)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_OK

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        shared = self.current.run.shared if self.current is not None else None
        if shared is not None:
            shared.request_stop()

    def loop(self) -> None:
        while not self.received:
            self.tick()
            if time.monotonic() - self.looked_at >= self.settings.poll_seconds:
                self.look()
            served = False
            names = list(self.columns)
            for index in range(len(names)):
                column = self.columns.get(names[(self.turn + index) % len(names)])
                if self.received:
                    return
                if column is None or not column.dirty or column.parked_until > time.monotonic():
                    continue
                served = self.give_slice(column) or served
            self.turn += 1
            if not served and not self.received:
                self.wait()

    # --- the columns -------------------------------------------------------------------------------
    def look(self) -> None:
        """Look up the tracked columns again (new ones set up, untracked ones dropped), and count the rows
        each has waiting."""
        conn = self._connection()
        if conn is None:
            return
        try:
            found = tracked.discover(conn, self.settings)
        except (psycopg2.Error, EtlError) as error:
            self._away(error)
            return
        self.looked_at = time.monotonic()
        names = set()
        for kept in found:
            names.add(kept.name)
            known = self.columns.get(kept.name)
            if known is not None and known.settings == kept.settings:
                continue
            if known is not None:
                self._drop(kept.name, "its record or the configuration changed")
            with logs.column(kept.name):
                why = kept.why or self._add(kept)
                if why is not None and self.alone.get(kept.name) != why:
                    log.warning("column %s is left alone: %s", kept.name, why)
            if why is None:
                self.alone.pop(kept.name, None)
            else:
                self.alone[kept.name] = why
        for name in [name for name in self.columns if name not in names]:
            self._drop(name, "no longer tracked")
        for name in [name for name in self.alone if name not in names]:
            del self.alone[name]
        for column in self.columns.values():
            column.dirty = True
            self._count(column)

    def _add(self, kept: tracked.Kept) -> str | None:
        """Set up a column (its API key's lease and limiter, its guard and Run); None, or why it is left alone."""
        settings = kept.settings
        assert settings is not None
        try:
            provider = make_provider(settings)
            if provider.quota_key not in self.keys:
                limiter = RateLimiter(self.context, settings.rpm, settings.tpm, settings.workers)
                lease = Lease(settings, SERVE_TABLES, limiter)
                lease.renew()
                self.keys[provider.quota_key] = (limiter, lease)
            limiter, lease = self.keys[provider.quota_key]
            shape = self.shapes.setdefault((provider.endpoint, provider.model), Shape(self.context))
            target, _, _, identity = driver.prepare(settings, self.processes, limiter, shape, lease)
            run = Run(settings, target, self.processes, self.context, limiter, shape, lease, identity)
        except (psycopg2.Error, EtlError) as error:
            return db.first_line(error)
        run.received = self.received  # one list: a signal reaches the pass under way
        run.also_tick = self.tick
        run.progress = Progress(sys.stderr, interval=math.inf, tty=False)  # no bar, no line: serve says its own
        column = Column(dataclasses.replace(kept, target=target), run, self.processes)
        self.columns[kept.name] = column
        log.info("keeping %s filled with %s", kept.name, describe_identity(identity))
        return None

    def _drop(self, name: str, why: str) -> None:
        column = self.columns.pop(name)
        column.run.embedder.close()
        log.info("column %s: %s; no longer kept", name, why)

    def give_slice(self, column: Column) -> bool:
        """One pass over the column's rows to embed, of at most its slice; True when it took rows."""
        conn = self._connection()
        if conn is None:
            return False
        run = column.run
        try:
            if not catalog.has_rows_to_embed(conn, column.target, False, run.lease.run_id):
                column.dirty = False
                column.counted(0)
                return False
            ranges = planner.plan_ranges(conn, column.target, self.processes, column.settings.batch_size)
        except (psycopg2.Error, EtlError) as error:
            self._away(error)
            return False
        self._close_listener()  # no socket crosses the fork
        for _, lease in self.keys.values():
            lease.close()
        before, started = run.totals(), time.monotonic()
        run.limiter["last_success"] = started  # an idle spell is no stall
        self.current = column
        try:
            with logs.column(column.name):  # in the JSON lines of the pass, the workers' too
                run.embed(ranges, limit=column.slice)
        finally:
            self.current = None
        after, elapsed = run.totals(), time.monotonic() - started
        took = after["embedded"] + after["failed"] - before["embedded"] - before["failed"]
        if run.fatal is not None:
            # The database gone: the loop's own connection waits for it. Anything else waits PARK_SECONDS.
            park = 0.0 if isinstance(run.fatal, DatabaseGone) else PARK_SECONDS
            with logs.column(column.name):
                log.warning("column %s: %s; trying it again in %.0f s", column.name, run.fatal, park)
            column.parked_until = time.monotonic() + park
            run.fatal = None
        if took:
            column.slice = max(self.processes * column.settings.batch_size, round(took / elapsed * SLICE_SECONDS))
        column.dirty = took > 0  # rows claimed by another run: wait for a notification or the next look
        self._say(column, after)
        return took > 0

    def _count(self, column: Column) -> None:
        conn = self._connection()
        if conn is None:
            return
        try:
            column.counted(catalog.count_null(conn, column.target))
        except psycopg2.errors.QueryCanceled:
            log.debug("counting the rows waiting in %s took over %s", column.name, LOOK_TIMEOUT)
        except (psycopg2.Error, EtlError) as error:
            self._away(error)

    def _say(self, column: Column, totals: dict[str, int]) -> None:
        """A line per column that embedded rows, every SAY_SECONDS at most."""
        if time.monotonic() - self.said_at < SAY_SECONDS and column.said:
            return
        if totals["embedded"] + totals["failed"] == column.said.get("embedded", 0) + column.said.get("failed", 0):
            return
        self.said_at, column.said = time.monotonic(), dict(totals)
        with logs.column(column.name):
            log.info(
                "column %s embedded=%d failed=%d tokens=%d requests=%d rate_limited=%d",
                column.name,
                *(totals[name] for name in ("embedded", "failed", "tokens", "requests", "rate_limited")),
            )

    # --- the database -------------------------------------------------------------------------------
    def _connection(self) -> db.Connection | None:
        """The loop's connection, LISTENing on every kept column's channel (reopened when lost: a fresh
        LISTEN may have missed notifications, so every column is looked at again); None while the
        database is away."""
        try:
            if self.listener is None:
                name = f"{db.APPLICATION_PREFIX}:serve:r{multiprocessing.current_process().pid}w0"
                self.listener = db.connect(self.settings.database_url, application_name=name, timeout=5)
                self.listener.autocommit = True
                with self.listener.cursor() as cur:
                    cur.execute("SET statement_timeout = %s", (LOOK_TIMEOUT,))
                self.listening = set()
                for column in self.columns.values():
                    column.dirty = True
            with self.listener.cursor() as cur:
                for channel in {column.channel for column in self.columns.values()} - self.listening:
                    cur.execute(sql.SQL(db.load_sql("sync/listen")).format(channel=sql.Identifier(channel)))
                    self.listening.add(channel)
        except (psycopg2.Error, EtlError) as error:
            self._away(error)
            return None
        self.db_seen = time.monotonic()
        if self.lost:
            self.lost = False
            log.info("the database answers again")
        return self.listener

    def _away(self, error: BaseException) -> None:
        """The database did not answer: say so once, drop the connection, wait a second (ticking)."""
        if not self.lost:
            self.lost = True
            log.warning("lost the database (%s); trying again every second", db.first_line(error))
        self._close_listener()
        self._idle(1.0)

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.listener = None

    def wait(self) -> None:
        """Until a notification (then DEBOUNCE_SECONDS more, for full batches), the next look, a parked
        column's turn, or a signal."""
        conn = self._connection()
        if conn is None:
            return
        parked = [column.parked_until for column in self.columns.values() if column.parked_until > time.monotonic()]
        deadline = min([self.looked_at + self.settings.poll_seconds, *parked])
        woken: float | None = None
        by_channel = {column.channel: column for column in self.columns.values()}
        while not self.received:
            now = time.monotonic()
            end = min(deadline, woken + DEBOUNCE_SECONDS) if woken else deadline
            if now >= end:
                return
            self.tick()
            try:
                if select.select([conn], [], [], min(0.5, end - now))[0]:
                    conn.poll()
            except (psycopg2.Error, OSError) as error:
                self._away(error)
                return
            while conn.notifies:
                column = by_channel.get(conn.notifies.pop().channel)
                if column is not None:
                    column.dirty = True
                    woken = woken or time.monotonic()

    def _idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.received and time.monotonic() < deadline:
            self.tick()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def tick(self) -> None:
        """Between two looks: every lease a step further (never waiting), and the loop's heartbeat."""
        for _, lease in self.keys.values():
            lease.tick()
        self.beat = time.monotonic()

    # --- what /healthz and /metrics read (from their thread) ---------------------------------------
    def health(self) -> tuple[bool, str]:
        """(healthy, why): the database answered within HEALTH_SECONDS and the loop turns."""
        now = time.monotonic()
        renewed = [limiter["renewed_at"] for limiter, _ in list(self.keys.values())]
        seen = max([self.db_seen, *renewed])
        if now - seen > HEALTH_SECONDS:
            return False, f"the database has not answered for {now - seen:.0f} s"
        if now - self.beat > HEALTH_SECONDS:
            return False, f"the service's loop has not turned for {now - self.beat:.0f} s"
        return True, f"ok: {len(self.columns)} columns kept, {len(self.alone)} left alone"


def serve(settings: "Settings") -> int:
    """`etl.py serve`: returns the exit code."""
    return Service(settings).serve()
