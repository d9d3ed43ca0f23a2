"""serve's own connection to the database: LISTEN on the kept columns' channels, and the loop's short
queries (discovery, probes, counts), each bounded by LOOK_TIMEOUT. Reopened when lost (a fresh LISTEN
may have missed notifications: `fresh` says so); a database that is away is said once, and again
when it answers."""

import logging
import os
import select
import time
from collections.abc import Callable, Iterable

import psycopg2
from psycopg2 import sql

from . import db
from .errors import EtlError
from .follow import DEBOUNCE_SECONDS

log = logging.getLogger(__name__)

LOOK_TIMEOUT = "5s"  # the loop's own queries never hold it longer


class Listener:
    def __init__(self, database_url: str | None, tick: Callable[[], None], stopped: Callable[[], bool]) -> None:
        self.database_url = database_url
        self.tick, self.stopped = tick, stopped  # the loop's work while it waits; a signal came
        self.conn: db.Connection | None = None
        self.listening: set[str] = set()
        self.fresh = False  # reopened since the caller last looked: notifications may have been missed
        self.lost = False  # the database is away (said once)
        self.seen_at = time.monotonic()  # the database last answered this connection

    def connection(self, channels: Iterable[str]) -> db.Connection | None:
        """The connection, LISTENing on every channel of `channels`; None while the database is away."""
        try:
            if self.conn is None:
                name = f"{db.APPLICATION_PREFIX}:serve:r{os.getpid()}w0"  # `status` counts it while it waits
                self.conn = db.connect(self.database_url, application_name=name, timeout=5)
                self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("SET statement_timeout = %s", (LOOK_TIMEOUT,))
                self.listening, self.fresh = set(), True
            with self.conn.cursor() as cur:
                for channel in set(channels) - self.listening:
                    cur.execute(sql.SQL(db.load_sql("sync/listen")).format(channel=sql.Identifier(channel)))
                    self.listening.add(channel)
        except (psycopg2.Error, EtlError) as error:
            self.away(error)
            return None
        self.seen_at = time.monotonic()
        if self.lost:
            self.lost = False
            log.info("the database answers again")
        return self.conn

    def away(self, error: BaseException) -> None:
        """The database did not answer: say so once, drop the connection, wait a second."""
        if not self.lost:
            self.lost = True
            log.warning("lost the database (%s); trying again every second", db.first_line(error))
        self.close()
        self.idle(1.0)

    def idle(self, seconds: float) -> None:
        """Sleep up to `seconds` (less after a signal), ticking."""
        deadline = time.monotonic() + seconds
        while not self.stopped() and time.monotonic() < deadline:
            self.tick()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Close it (before a fork: no socket crosses it)."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def wait(self, channels: Iterable[str], deadline: float) -> set[str]:
        """The channels notified: after the first notification, DEBOUNCE_SECONDS more (a burst of edits
        becomes full batches); or none by `deadline`, or at a signal."""
        conn = self.connection(channels)
        if conn is None:
            return set()
        woken: float | None = None
        notified: set[str] = set()
        while not self.stopped():
            now = time.monotonic()
            end = min(deadline, woken + DEBOUNCE_SECONDS) if woken else deadline
            if now >= end:
                break
            self.tick()
            try:
                if select.select([conn], [], [], min(0.5, end - now))[0]:
                    conn.poll()
            except (psycopg2.Error, OSError) as error:
                self.away(error)
                break
            while conn.notifies:
                notified.add(conn.notifies.pop().channel)
                woken = woken or time.monotonic()
        return notified
