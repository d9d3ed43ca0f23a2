"""The worker: a single-threaded pool process that claims, embeds and writes batches.

A batch is claimed in one short committed transaction (etl_claims, no row lock), embedded with
no transaction open, and written in another short transaction that lands a vector only where the
row is still NULL with the text that was sent. A server that is down, slow or refusing everything
is the run's problem (wait, then stop the run with one line), never a row's: a row is recorded in
etl_failures only when the table refuses it, or the server refuses it alone while it answers others.

A run has `--workers` requests in flight: a run-wide semaphore of that many slots, held from
the rate-limit budget to the answer's last byte. The pool has a few spare processes
(`process_count`) that send requests while others decode, write and claim. Ranges come from
a queue in shared memory; each process opens its own connection in the child. The API
client is built once in the parent before the fork, before it has opened any connection:
each child uses its own copy (the SDK's TLS setup then takes one copy of memory, not one
per process), and nothing that holds a socket crosses the fork.
"""

import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import psycopg2

from . import db
from .errors import DatabaseError, DatabaseGone, FatalProviderError, Stop
from .lease import LEASE_SECONDS, RENEW_SECONDS
from .planner import Range, RangeCursor
from .requester import Failure, Requester, Row, backoff
from .store import WorkerStore
from .texts import fit, row_text

if TYPE_CHECKING:
    from .catalog import Target
    from .settings import Settings
    from .shared import SharedState

log = logging.getLogger(__name__)

LEASE_TRUSTED_SECONDS = LEASE_SECONDS - 3 * RENEW_SECONDS  # a renewal older than this may be no lease at all


def process_count(workers: int) -> int:
    """Pool processes for --workers requests in flight: the spare ones decode, write and claim
    while the others wait on the API. At least four: with three, a DB-bound run of two
    workers waits on its own writes (bench/RESULTS.md)."""
    return max(4, workers + max(1, workers // 4))


class Worker:
    """One pool process of a backfill: its ranges, its connection (once opened) and its requests."""

    def __init__(
        self,
        settings: "Settings",
        target: "Target",
        ranges: Sequence[Range],
        shared: "SharedState",
        requester: Requester,
        number: int,
        run_id: str,
        identity: Mapping[str, Any],
    ) -> None:
        self.settings = settings
        self.target = target
        self.ranges = ranges
        self.shared = shared
        self.requester = requester
        self.number = number
        self.run_id = run_id
        self.identity = identity  # what the column's record must say (confirmed by the first write)
        self.store: WorkerStore | None = None
        self.lows: list[str] = []  # where the claims of the batch at hand start: its write releases them
        self.db_retries = 0
        self.lost_since: float | None = None  # when the database connection was lost, until a write succeeds again
        self.warned_at = -60.0

    # --- lifetime --------------------------------------------------------------------------
    def open(self) -> None:
        if self.store is None:
            self.store = self._connect()

    def _connect(self, timeout: float = 10) -> WorkerStore:
        # r<pid of the run>w<N>: `status` counts runs and their processes (sql/status/status_active.sql)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:r{os.getppid()}w{self.number}"
        conn = db.connect(self.settings.database_url, application_name=name, timeout=timeout)
        try:
            return WorkerStore(conn, self.target, self.run_id, self.settings.retry_failed)
        except psycopg2.Error as error:
            conn.close()
            raise DatabaseError(f"cannot prepare a worker's session: {db.explain(error)}") from error

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.requester.embedder.close()

    # --- the ranges ----------------------------------------------------------------------------
    def run(self) -> None:
        """Claim, embed and write one batch after another until no range is left.
        A batch may draw from several ranges, so every request but the last is full."""
        cursor = RangeCursor(self._take_range)
        while not self.shared.stopping():
            try:
                batch, reserved = self._claim(cursor)
            except psycopg2.Error as error:
                cursor.rollback()
                self._recover(error)
                continue
            if not batch:
                return
            try:
                counts = self.process_batch(batch)
            except Stop:
                self.shared.release_rows(reserved)
                return
            cursor.commit()
            self.shared.add(**counts)

    def _claim(self, cursor: RangeCursor) -> tuple[list[tuple[Any, ...]], int]:
        """The next batch's rows, claimed and committed: ([(row_id, hash, *texts)], rows reserved under --limit)."""
        size = self.settings.batch_size
        batch: list[tuple[Any, ...]] = []
        reserved = 0
        assert self.store is not None  # opened before run()
        try:
            while len(batch) < size:
                granted = self.shared.reserve_rows(size - len(batch))
                segment = cursor.segment() if granted else None
                if segment is None:  # no range left, or --limit reached
                    self.shared.release_rows(granted)
                    break
                reserved += granted
                self._wait_for_lease()
                rows = self.store.claim(*segment, granted)
                self.lows += [rows[0][0]] if rows else []
                self.shared.release_rows(granted - len(rows))
                reserved -= granted - len(rows)
                batch.extend(rows)
                cursor.advance(rows[-1][0] if rows else None, len(rows) == granted)
        except psycopg2.Error:
            self.shared.release_rows(reserved)
            raise
        self.db_retries, self.lost_since = 0, None
        return batch, reserved

    def _wait_for_lease(self) -> None:
        """Claim only while the run's lease is renewed (the parent stopped, or cut off from the
        database, lets its claims die: then another run's claims would meet these)."""
        stale = time.monotonic() - self.requester.limiter["renewed_at"]
        if stale <= LEASE_TRUSTED_SECONDS:
            return
        log.warning("the run's lease has not been renewed for %.0f s: no claim until it is", stale)
        while time.monotonic() - self.requester.limiter["renewed_at"] > LEASE_TRUSTED_SECONDS:
            if self.shared.sleep(0.5):
                raise Stop()

    def _take_range(self) -> Range | None:
        index = self.shared.take_range()
        return cast(Range, tuple(self.ranges[index])) if index < len(self.ranges) else None

    def _recover(self, error: psycopg2.Error) -> None:
        """A statement failed and rolled back: reopen a lost connection, retry a transient error
        (deadlock, serialization failure, lock or statement timeout) a few times, stop on anything else."""
        assert self.store is not None
        if not self.store.alive():
            self._reconnect(error)
            return
        if error.pgcode in db.TRANSIENT_SQLSTATES and self.db_retries < self.settings.max_attempts:
            self.db_retries += 1
            delay = backoff(self.db_retries)
            log.warning("%s; the batch rolled back, trying it again in %.1f s", db.first_line(error), delay)
            if self.shared.sleep(delay):
                raise Stop()
            return
        raise DatabaseError(f"database error on {self.target.display}: {db.explain(error)}") from error

    def _reconnect(self, error: psycopg2.Error) -> None:
        """Open a new connection, for --reconnect-seconds of wall-clock time counted from when the
        connection was lost (a connection that comes back and drops again before any write does
        not start the window again)."""
        window = self.settings.reconnect_seconds
        now = time.monotonic()
        self.lost_since = self.lost_since or now
        deadline = self.lost_since + window
        said = now - self.warned_at > 60  # a server that closes idle sessions would make this every batch
        if said:
            self.warned_at = now
            log.warning(
                "lost the database connection (%s); reconnecting for up to %.0f s", db.first_line(error), window
            )
        assert self.store is not None
        self.store.close()
        self.store = None
        delay = 0.25
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseGone(
                    f"lost the database connection and could not reconnect within {window:.0f} s "
                    f"({db.first_line(error)}); check the server, then rerun to resume"
                )
            if self.shared.sleep(min(delay, left)):
                raise Stop()
            try:
                self.store = self._connect(timeout=max(1.0, deadline - time.monotonic()))
                log.log(logging.INFO if said else logging.DEBUG, "reconnected to the database")
                return
            except DatabaseError:  # the server may drop again while we set up
                delay = min(delay * 2, 5.0)

    # --- one batch -----------------------------------------------------------------------------
    def process_batch(self, claimed: list[tuple[Any, ...]]) -> dict[str, int]:
        """Embed the claimed rows and write their vectors (with the rows that failed recorded and
        the claims released) in one short transaction. Returns the counts for the shared totals."""
        failures, rows, truncated, hashes = [], [], 0, {}
        limit = self.requester.input_limit()
        exact = self.settings.tpm is not None  # a token budget needs real counts
        for row_id, digest, *values in claimed:
            text = row_text(values)
            if not text:
                failures.append((row_id, "empty text", 1))
                continue
            fitted, tokens, was_cut = fit(text, limit, exact)
            if was_cut and not self.settings.truncate:
                failures.append((row_id, f"input is over the model's limit of {limit} tokens (--no-truncate)", 1))
                continue
            truncated += was_cut
            hashes[row_id] = digest
            rows.append(Row(row_id, fitted, tokens))

        embedded, refused = self.requester.embed(rows)
        failures += refused
        ids = [row.row_id for chunk, _ in embedded for row in chunk]
        matrix = None
        if ids:
            blocks = [vectors for _, vectors in embedded]
            for block in blocks:
                self.check_width(block.shape[1])
            matrix = blocks[0] if len(blocks) == 1 else np.vstack(blocks)
            fits = self.target.kind.holds(matrix)
            if not fits.all():
                why = f"the API returned a vector with NaN, infinity or a value {self.target.vector_type} cannot hold"
                failures.extend((row_id, why, 1) for row_id, ok in zip(ids, fits) if not ok)
                ids = [row_id for row_id, ok in zip(ids, fits) if ok]
                matrix = matrix[fits]
        written, failed, left = self.write(ids, [hashes[row_id] for row_id in ids], matrix, failures)
        for row_id, reason, _ in failed:
            log.warning("row %s failed: %s", row_id, reason)
        return {"embedded": written, "failed": len(failed), "truncated": truncated, "left": sum(left.values())}

    def write(
        self, ids: list[str], hashes: list[int | None], matrix: np.ndarray | None, failures: list[Failure]
    ) -> tuple[int, list[Failure], Counter[str]]:
        """store.write, again after a lost connection or a transient error: the vectors are kept, not
        paid for again (the claims are still this run's, and the write checks every row anew)."""
        assert self.store is not None
        while True:
            try:
                result = self.store.write(ids, hashes, matrix, failures, self.identity, self.lows)
                self.db_retries, self.lost_since, self.lows = 0, None, []
                return result
            except psycopg2.Error as error:
                self._recover(error)

    def check_width(self, width: int) -> None:
        error = self.target.width_error(self.settings, width, bool(self.requester.shape["no_dimensions"]))
        if error:
            raise FatalProviderError(error)
