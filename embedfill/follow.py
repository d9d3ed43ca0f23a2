"""--follow: after the backlog, keep the column filled: sleep on LISTEN (and look every
--poll-seconds), then run a pass over the rows that need a vector; until a signal or a fatal error."""

import logging
import os
import select
import time
from typing import TYPE_CHECKING

import psycopg2
from psycopg2 import sql

from . import catalog, db, planner
from .errors import DatabaseError

if TYPE_CHECKING:
    from .passes import Run

log = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 1.0  # after a notification, gather the rest of a burst this long


class Follower:
    """The follow loop of a Run (its passes, lease, progress and signals)."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.settings, self.target = run.settings, run.target

    def follow(self) -> None:
        """After the backlog: sleep on LISTEN (and a poll every --poll-seconds), then embed the rows
        that need a vector in another pass; until a signal or a fatal error."""
        if self.run.progress is not None:
            self.run.progress.set_total(None)
        log.info(
            "backlog done; following %s (LISTEN, and a look every %g s)",
            self.target.display,
            self.settings.poll_seconds,
        )
        listener, look = None, True
        while not self.run.received and self.run.fatal is None:
            try:
                listener = listener or self._listen()
                if listener is None:
                    break
                if look and catalog.has_rows_to_embed(listener, self.target, False, self.run.lease.run_id):
                    ranges = planner.plan_ranges(listener, self.target, self.run.processes, self.settings.batch_size)
                    log.debug("rows to embed: a pass over %d ranges", len(ranges))
                    listener.close()  # no socket crosses the fork
                    listener = None
                    self.run.lease.close()
                    before = self.run.totals()
                    self.run.limiter["last_success"] = time.monotonic()  # an idle spell is no 429 stall
                    if not self.run.embed(ranges):
                        return
                    # A pass that took nothing (rows locked by another run) waits before looking again.
                    after = self.run.totals()
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

    def _listen(self) -> db.Connection | None:
        """A connection LISTENing on the table's channel, waiting up to --reconnect-seconds for the
        database; None after a signal or when the database stayed away (then `fatal` says so)."""
        window = self.settings.reconnect_seconds
        deadline = time.monotonic() + window
        # w0: `status` counts the follower as an active run while it waits (sql/status/status_active.sql)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:r{os.getpid()}w0"
        channel = catalog.tracking_name(self.target)[1]
        while True:
            conn = None
            try:
                conn = db.connect(self.settings.database_url, application_name=name)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(sql.SQL(db.load_sql("sync/listen")).format(channel=sql.Identifier(channel)))
                return conn
            except (psycopg2.Error, DatabaseError) as error:
                if conn is not None:
                    conn.close()
                if time.monotonic() > deadline:
                    self.run.fatal = DatabaseError(
                        f"lost the database connection and could not reconnect within {window:.0f} s "
                        f"({db.first_line(error)}); check the server, then rerun"
                    )
                    return None
            if self._idle(1.0):
                return None

    def _wait(self, conn: db.Connection) -> None:
        """Until a notification (then DEBOUNCE_SECONDS more, so that a burst of edits becomes
        full batches), --poll-seconds, or a signal."""
        deadline = time.monotonic() + self.settings.poll_seconds
        woken = time.monotonic() if conn.notifies else None
        while not self.run.received:
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

    def _idle(self, seconds: float) -> bool:
        """Sleep up to `seconds`, keeping the lease and the progress lines; True on a signal."""
        deadline = time.monotonic() + seconds
        while not self.run.received and time.monotonic() < deadline:
            self._tick()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return bool(self.run.received)

    def _tick(self) -> None:
        self.run.tick()
