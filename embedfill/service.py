"""`serve`: one long-running process keeps every tracked column of the database filled (tracked.py
says which), with one pool of --workers requests in flight that the columns with work share fairly.

One loop, in the parent: it sleeps on LISTEN (every tracked column's channel, on one connection)
and looks every --poll-seconds; then, round robin over the columns with rows to embed, it gives each
a slice: one pass of the worker pool (passes.Run: claims, the model guard, the failure ledger,
reconnects, as for any run) of at most the rows the column's last pass embedded in SLICE_SECONDS,
so that a backlog holds the other columns back by one slice at most. The columns of one API key share
one lease and one rate limiter: one quota, divided with the other runs and serve processes on that key
through PostgreSQL as runs divide it. /healthz and /metrics (metrics.py) answer from a thread that
reads what this loop and the workers' counters say, never the database."""

import dataclasses
import logging
import math
import multiprocessing
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import psycopg2

from . import catalog, db, driver, logs, planner, schema, tracked
from .errors import EXIT_SIGINT, EXIT_SIGTERM, DatabaseGone, EtlError
from .guard import describe_identity
from .lease import SERVE_TABLES, Beat, Lease, end_dead_runs
from .listener import Listener
from .parser import command_name
from .passes import Run
from .progress import Progress
from .providers import make_provider
from .ratelimit import RateLimiter
from .shape import Shape
from .texts import load_encoding
from .tracked import Column, Kept
from .worker import process_count

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

SLICE_SECONDS = 5.0  # a column's pass, when others wait: about this long; cut when no request succeeded in it
PARK_SECONDS, PARK_MOST = 300.0, 3600.0  # a pass stopped on an error: its column waits 5 min, then twice as long...
CUT_SECONDS, CUT_MOST = 30.0, 600.0  # a pass cut (its server failing): 30 s, then twice as long...
BUSY_SECONDS = 10.0  # a column whose table did not answer in LOOK_TIMEOUT (locked) is looked at again after this
SAY_SECONDS = 60.0  # a line per column that embedded something, this often


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
        self.retired: dict[str, dict[str, int]] = {}  # the totals of columns let go: their counters go on
        self.listener = Listener(settings.database_url, self.tick, lambda: bool(self.received))
        self.pulse = Beat(settings.database_url, "SELECT 1")  # /healthz: does the database answer, now?
        self.looked_at = -math.inf
        self.turn = 0  # round robin: where the next round starts
        self.beat = time.monotonic()
        self.current: Column | None = None

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
        said = f"; /healthz and /metrics on http://{self.settings.http}" if http else ""
        where, workers = db.describe_url(self.settings.database_url), self.settings.workers
        log.info("serving the tracked columns of %s, %d requests in flight at most%s", where, workers, said)
        try:
            self.loop()
        finally:
            self.listener.close()
            self.pulse.close()
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
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM

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
            served, names = False, list(self.columns)
            for index in range(len(names)):
                column = self.columns.get(names[(self.turn + index) % len(names)])
                if self.received:
                    return
                if column is None or not column.dirty or column.parked_until > time.monotonic():
                    continue
                self.tick()  # a probe of a locked table takes LOOK_TIMEOUT: the lease and /healthz go on
                served = self.give_slice(column) or served
            self.turn += 1
            if not served and not self.received:
                self.wait()

    def look(self) -> None:
        """Look up the tracked columns again (new ones set up, untracked ones dropped), and count the rows
        each has waiting."""
        conn = self._connection()
        if conn is None:
            return
        try:
            found = tracked.discover(conn, self.settings)
        except (psycopg2.Error, EtlError) as error:
            self.listener.away(error)
            return
        if not found and self.looked_at == -math.inf:  # the first look: say how to give it a column
            log.info("no tracked column yet: `%s init --track-changes --table T --text-columns A,B`", command_name())
        self.looked_at = time.monotonic()
        names = set()
        for kept in found:
            self.tick()
            names.add(kept.name)
            known = self.columns.get(kept.name)
            if kept.busy or (known is not None and known.settings == kept.settings):
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
        self.alone = {name: why for name, why in self.alone.items() if name in names}
        for column in list(self.columns.values()):
            self.tick()
            column.dirty = True
            self._count(column)

    def _add(self, kept: Kept) -> str | None:
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
        column = Column(
            dataclasses.replace(kept, target=target), run, self.processes, self.retired.pop(kept.name, None)
        )
        self.columns[kept.name] = column
        log.info("keeping %s filled with %s", kept.name, describe_identity(identity))
        return None

    def _drop(self, name: str, why: str) -> None:
        column = self.columns.pop(name)
        column.run.embedder.close()
        self.retired[name] = column.totals()
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
        except psycopg2.errors.QueryCanceled:  # its table is locked (VACUUM FULL, a migration): later
            column.parked_until = time.monotonic() + BUSY_SECONDS
            return False
        except (psycopg2.Error, EtlError) as error:
            self.listener.away(error)
            return False
        self.listener.close()  # no socket crosses the fork
        self.pulse.close()
        for _, lease in self.keys.values():
            lease.close()
        before, started = run.totals(), time.monotonic()
        run.limiter["last_success"] = started  # an idle spell is no stall
        self.current, column.cut = column, False
        try:
            with logs.column(column.name):  # in the JSON lines of the pass, the workers' too
                run.embed(ranges, limit=column.slice)
        finally:
            self.current = None
        after, elapsed = run.totals(), time.monotonic() - started
        took = after["embedded"] + after["failed"] - before["embedded"] - before["failed"]
        if isinstance(run.fatal, DatabaseGone):  # the loop's own connection waits for the database
            log.warning("column %s: %s", column.name, run.fatal)
        elif run.fatal is not None:
            column.failed(str(run.fatal), PARK_SECONDS, PARK_MOST)
        elif column.cut:
            why = f"no request succeeded for {SLICE_SECONDS:g} s while others waited (its server's errors are above)"
            column.failed(why, CUT_SECONDS, CUT_MOST)
        elif took:
            column.took(column.totals(), SAY_SECONDS)
            column.slice = max(self.processes * column.settings.batch_size, round(took / elapsed * SLICE_SECONDS))
        run.fatal = None
        # A failed pass's column goes again when its wait ends; rows claimed by another run: at a notification or look
        column.dirty = took > 0 or column.parked_until > time.monotonic()
        return took > 0

    def _count(self, column: Column) -> None:
        """How many rows wait in the column (LOOK_TIMEOUT at most: a locked table keeps the last count)."""
        conn = self._connection()
        if conn is None:
            return
        try:
            column.counted(catalog.count_null(conn, column.target))
        except psycopg2.errors.QueryCanceled:  # its table is locked: no probe of it for a while either
            column.parked_until = time.monotonic() + BUSY_SECONDS
        except (psycopg2.Error, EtlError) as error:
            self.listener.away(error)

    def _connection(self) -> db.Connection | None:
        """The loop's connection (listener.py), LISTENing on every kept column's channel; reopened, every
        column is looked at again (a notification may have been missed)."""
        conn = self.listener.connection(self._channels())
        if self.listener.fresh:
            self.listener.fresh = False
            for column in self.columns.values():
                column.dirty = True
        return conn

    def _channels(self) -> list[str]:
        return [column.channel for column in self.columns.values()]

    def wait(self) -> None:
        """Until a notification, the next look, a parked column's turn, or a signal."""
        now = time.monotonic()
        parked = [column.parked_until for column in self.columns.values() if column.parked_until > now]
        deadline = min([self.looked_at + self.settings.poll_seconds, *parked])
        notified = self.listener.wait(self._channels(), deadline)
        for column in self.columns.values():
            column.dirty = column.dirty or column.channel in notified

    def tick(self) -> None:
        """Between two looks, and during a pass: every lease a step further (never waiting), the loop's
        heartbeat; and a pass whose server fails (no request succeeded for SLICE_SECONDS, not for 429s)
        is cut when other columns are kept."""
        for _, lease in self.keys.values():
            lease.tick()
        self.pulse.tick()
        self.beat = time.monotonic()
        if self.current is not None and len(self.columns) > 1:
            self.current.cut_if_stuck(SLICE_SECONDS)
