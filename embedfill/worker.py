"""The worker: a single-threaded pool process that claims, embeds, writes and commits batches.

A run has `--workers` requests in flight: a run-wide semaphore of that many slots, held from
the rate-limit budget to the answer's last byte. The pool has a few spare processes
(`process_count`) that send requests while others decode, write and claim. Ranges come from
a queue in shared memory; each process opens its own connection in the child. The API
client is built once in the parent before the fork, before it has opened any connection:
each child uses its own copy (the SDK's TLS setup then takes one copy of memory, not one
per process), and nothing that holds a socket crosses the fork.
"""

import logging
import multiprocessing.util
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import psycopg2

from . import db, logs
from .errors import DatabaseError, EtlError, FatalProviderError, InvalidInputError, TransientProviderError
from .models import MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST
from .texts import fit, row_text

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A worker that has never embedded anything and sees this many single inputs refused is
# misconfigured (a `dimensions` the model does not take, say), not unlucky.
REFUSALS_BEFORE_FATAL = 3
HALF_MAX = 65504.0  # the largest finite float16: halfvec stores nothing beyond it


def process_count(workers):
    """Pool processes for --workers requests in flight: the spare ones decode, write and claim
    while the others wait on the API. At least four: with three, a DB-bound run of two
    workers waits on its own writes (bench/RESULTS.md)."""
    return max(4, workers + max(1, workers // 4))


class Interrupted(Exception):
    """A stop was requested while this batch waited: roll it back and leave."""


@dataclass
class Row:
    row_id: str
    text: str
    tokens: int = 0


class RangeCursor:
    """Where one process stands in the ranges: the segment (after, upto) to claim from next,
    and the segments the open batch claimed from, walked again when the batch rolls back."""

    def __init__(self, take_range):
        self.take_range = take_range  # () -> (after, upto), or None when no range is left
        self.current = None
        self.again = []
        self.claimed = []  # where each segment the open batch claimed from stood when it started
        self.noted = False  # the current segment is in `claimed`

    def segment(self):
        """The (after, upto) to claim from next, or None when every range has been walked."""
        if self.current is None:
            self.current = self.again.pop(0) if self.again else self.take_range()
            self.noted = False
        if self.current is not None and not self.noted:
            self.claimed.append(self.current)
            self.noted = True
        return self.current

    def advance(self, last_id, full):
        """After a claim from `segment()`: past its last row if it was full, else the segment is done."""
        self.current = (last_id, self.current[1]) if full else None

    def commit(self):
        self.claimed, self.noted = [], False

    def rollback(self):
        """The open batch rolled back: walk its segments again, from where it started."""
        self.again = self.claimed + self.again
        self.claimed, self.current = [], None


class Worker:
    """One pool process: settings, shared memory and (once opened) its connection and client."""

    def __init__(self, settings, target, ranges, shared, limiter, requests, number, embedder):
        self.settings = settings
        self.target = target
        self.ranges = ranges
        self.shared = shared
        self.limiter = limiter
        self.requests = requests  # the run-wide semaphore: --workers requests in flight
        self.number = number
        self.store = None
        self.embedder = embedder  # built in the parent, unused there: this process's own copy
        self.succeeded = 0
        self.refused = 0
        self.db_retries = 0
        self.stops_others = True  # a fatal answer stops the run's other processes (verify reads each page's own)

    # --- lifetime --------------------------------------------------------------------------
    def open(self):
        if self.store is None:
            self.store = self._connect()

    def _connect(self):
        # r<pid of the run>w<N>: `status` counts runs and their processes (sql/status_active.sql)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:r{os.getppid()}w{self.number}"
        conn = db.connect(self.settings.database_url, application_name=name)
        try:
            return db.WorkerStore(conn, self.target, self.settings.retry_failed)
        except psycopg2.Error as error:
            conn.close()
            raise DatabaseError(f"cannot prepare a worker's session: {db.first_line(error)}") from error

    def close(self):
        if self.store is not None:
            self.store.close()
        self.embedder.close()

    # --- the ranges ----------------------------------------------------------------------------
    def run(self):
        """Claim, embed, write and commit one batch after another until no range is left.
        A batch may draw from several ranges, so every request but the last is full."""
        cursor = RangeCursor(self._take_range)
        size = self.settings.batch_size
        while not self.shared.stopping():
            batch, reserved = [], 0
            try:
                while len(batch) < size:
                    granted = self.shared.reserve_rows(size - len(batch))
                    segment = cursor.segment() if granted else None
                    if segment is None:  # no range left, or --limit reached
                        self.shared.release_rows(granted)
                        break
                    reserved += granted
                    rows = self.store.claim(*segment, granted)
                    self.shared.release_rows(granted - len(rows))
                    reserved -= granted - len(rows)
                    batch.extend(rows)
                    cursor.advance(rows[-1][0] if rows else None, len(rows) == granted)
                counts = self.process_batch(batch) if batch else None
                self.store.commit()
                cursor.commit()
                self.db_retries = 0
            except Interrupted:
                self.store.rollback()
                self.shared.release_rows(reserved)
                return
            except psycopg2.Error as error:
                self.shared.release_rows(reserved)
                cursor.rollback()
                self._recover(error)
                continue
            if counts is None:
                return
            self.shared.add(**counts)

    def _take_range(self):
        index = self.shared.take_range()
        return tuple(self.ranges[index]) if index < len(self.ranges) else None

    def _recover(self, error):
        """The batch rolled back: reopen a lost connection, retry a transient error (deadlock,
        serialization failure, lock or statement timeout) a few times, stop on anything else."""
        if not self.store.alive():
            self._reconnect(error)
            return
        if error.pgcode in db.TRANSIENT_SQLSTATES and self.db_retries < self.settings.max_attempts:
            self.db_retries += 1
            delay = backoff(self.db_retries)
            log.warning("%s; the batch rolled back, trying it again in %.1f s", db.first_line(error), delay)
            if self.shared.sleep(delay):
                raise Interrupted()
            return
        raise DatabaseError(f"database error on {self.target.display}: {db.first_line(error)}") from error

    def _reconnect(self, error):
        window = self.settings.reconnect_seconds
        log.warning("lost the database connection (%s); reconnecting for up to %.0f s", db.first_line(error), window)
        self.store.close()
        self.store = None
        waited, delay = 0.0, 0.5
        while waited < window:
            if self.shared.sleep(delay):
                raise Interrupted()
            waited += delay
            try:
                self.store = self._connect()
                log.info("reconnected to the database")
                return
            except DatabaseError:  # the server may drop again while we set up
                delay = min(delay * 2, 5.0)
        raise DatabaseError(
            f"lost the database connection and could not reconnect within {window:.0f} s "
            f"({db.first_line(error)}); check the server, then rerun to resume"
        )

    # --- one batch -----------------------------------------------------------------------------
    def process_batch(self, claimed):
        """Embed the claimed rows, write their vectors, record the rows that failed; the caller commits.

        Returns the counts to add to the shared totals."""
        failures, rows, truncated = [], [], 0
        limit = self.settings.input_token_limit
        exact = self.settings.tpm is not None  # a token budget needs real counts
        for row_id, *values in claimed:
            text = row_text(values)
            if not text:
                failures.append((row_id, "empty text", 1))
                continue
            fitted, tokens, was_cut = fit(text, limit, exact)
            if was_cut and not self.settings.truncate:
                failures.append((row_id, f"input is over the model's limit of {limit} tokens (--no-truncate)", 1))
                continue
            truncated += was_cut
            rows.append(Row(row_id, fitted, tokens))

        ids, blocks = [], []
        for chunk in pack_requests(rows):
            embedded, failed = self.embed_rows(chunk)
            failures.extend(failed)
            for chunk_rows, vectors in embedded:
                ids.extend(row.row_id for row in chunk_rows)
                blocks.append(vectors)
        written = 0
        if ids:
            for block in blocks:
                self.check_dimensions(block.shape[1])
            matrix = blocks[0] if len(blocks) == 1 else np.vstack(blocks)
            finite = np.isfinite(matrix).all(axis=1)
            if self.target.vector_type == "halfvec":
                finite &= (np.abs(matrix) <= HALF_MAX).all(axis=1)
            if not finite.all():
                why = f"the API returned a vector with NaN, infinity or a value {self.target.vector_type} cannot hold"
                failures.extend((row_id, why, 1) for row_id, ok in zip(ids, finite) if not ok)
                ids = [row_id for row_id, ok in zip(ids, finite) if ok]
                matrix = matrix[finite]
            if ids:
                written, left = self.store.write(ids, matrix)
                failures.extend(left)
        self.store.record_failures(failures)
        for row_id, reason, _ in failures:
            log.warning("row %s failed: %s", row_id, reason)
        return {"embedded": written, "failed": len(failures), "truncated": truncated}

    def check_dimensions(self, width):
        expected = self.target.dimensions or self.settings.dimensions
        if not expected or width == expected:
            return
        what, advice = f"EMBEDDING_DIMENSIONS is {expected}", "the model or server ignores `dimensions`"
        if self.target.dimensions:
            what = f"{self.target.display}.{self.target.embedding_column} is {self.target.column_type}"
            advice = f"set EMBEDDING_DIMENSIONS={expected} or change the column"
        raise FatalProviderError(f"{what} but {self.settings.model_name} returned {width} dimensions; {advice}")

    def embed_rows(self, rows):
        """([(rows, vectors)], failures) for one request's rows, retrying and splitting as needed."""
        attempt = limited = 0
        texts = [row.text for row in rows]
        tokens = sum(row.tokens for row in rows)
        while True:
            try:
                # --workers requests in flight in the whole run: the slot is held from the budget
                # to the answer's last byte; back-offs and decoding happen outside it.
                with self.requests:
                    self.wait_for_budget(tokens)
                    try:
                        answer = self.embedder.fetch(texts)
                    except TransientProviderError as error:
                        if error.rate_limited:  # pause every worker before another one takes this slot,
                            limited += 1  # never past --stall-seconds (an hour's Retry-After would be a hang)
                            wanted = backoff(limited) if error.retry_after is None else error.retry_after
                            self.limiter.rate_limited(min(wanted, self._stall_left(error)))
                        raise
                    except FatalProviderError:  # a bad key or model: stop before another process sends
                        self._stop_others()
                        raise
                result = self.embedder.decode(answer)
            except TransientProviderError as error:
                self.shared.add(retries=1, rate_limited=int(error.rate_limited), requests=1)
                if error.rate_limited:  # "not now", never "this row is bad": no attempt is spent
                    delay = min(self.limiter.cooldown_left(), self._stall_left(error))
                    log.info("%s; trying again in %.1f s", error, delay)
                else:
                    attempt += 1
                    delay = backoff(attempt) if error.retry_after is None else error.retry_after
                    if attempt >= self.settings.max_attempts:
                        reason = f"gave up after {attempt} attempts: {error}"
                        return [], [(row.row_id, reason, attempt) for row in rows]
                    log.info("%s; attempt %d of %d in %.1f s", error, attempt + 1, self.settings.max_attempts, delay)
                if self.shared.sleep(delay):
                    raise Interrupted() from None
                continue
            except InvalidInputError as error:
                self.shared.add(requests=1)
                if len(rows) == 1:
                    self.refused += 1
                    if self.succeeded == 0 and self.refused >= REFUSALS_BEFORE_FATAL:
                        raise FatalProviderError(
                            f"the API refuses every input ({error}); check EMBEDDING_MODEL and EMBEDDING_DIMENSIONS"
                        ) from error
                    return [], [(rows[0].row_id, f"refused by the API: {error}", 1)]
                middle = len(rows) // 2
                left_ok, left_failed = self.embed_rows(rows[:middle])
                right_ok, right_failed = self.embed_rows(rows[middle:])
                return left_ok + right_ok, left_failed + right_failed
            self.succeeded += 1
            self.limiter.succeeded()
            self.shared.add(requests=1, tokens=result.tokens)
            self.limiter.observe(result.headers, result.tokens, tokens)
            return [(rows, result.vectors)], []

    def _stall_left(self, error):
        """Seconds left before the run has been rate limited for --stall-seconds with no request
        succeeding (then it stops: waiting longer would not help)."""
        window = self.settings.stall_seconds
        stalled = self.limiter.stalled_for()
        if stalled >= window:
            self._stop_others()
            raise FatalProviderError(
                f"rate limited for {stalled:.0f} s with no request succeeding (--stall-seconds {window:g}): "
                "another client may be using this key's quota; rerun when it is free, or lower --workers"
            ) from error
        return window - stalled

    def _stop_others(self):
        if self.stops_others:
            self.shared.request_stop(fatal=True)

    def wait_for_budget(self, tokens):
        """Reserve one request and `tokens`, then wait until the reservation and any shared
        cool-down (which another worker may extend meanwhile) have passed."""
        if self.shared.stopping():
            raise Interrupted()
        wait = self.limiter.reserve(tokens)
        while wait > 0:
            if self.shared.sleep(wait):
                raise Interrupted()
            wait = self.limiter.cooldown_left()


def backoff(attempt):
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def pack_requests(rows):
    """Split rows into requests of at most 2048 inputs and 300k tokens (the API's limits)."""
    chunk, chunk_tokens = [], 0
    for row in rows:
        if chunk and (len(chunk) >= MAX_INPUTS_PER_REQUEST or chunk_tokens + row.tokens > MAX_TOKENS_PER_REQUEST):
            yield chunk
            chunk, chunk_tokens = [], 0
        chunk.append(row)
        chunk_tokens += row.tokens
    if chunk:
        yield chunk


_worker = None


def init_worker(settings, target, ranges, shared, limiter, requests, embedder):
    """Pool initializer: runs once in each new worker process."""
    global _worker
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop. SIGTERM
    # from the parent (pool.terminate after the grace period) ends the process: its open
    # transaction is rolled back by PostgreSQL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    number = shared.register_worker()
    logs.set_process_name(f"w{number}")
    _worker = Worker(settings, target, ranges, shared, limiter, requests, number, embedder)
    multiprocessing.util.Finalize(_worker, _worker.close, exitpriority=10)


def embed_ranges(_task):
    """Pool task (one per process): walk ranges until none is left.
    A fatal error stops every worker and reaches the parent as a one-line EtlError."""
    worker = _worker
    if worker.shared.stopping():
        return
    worker.shared.set_busy(True)
    try:
        worker.open()
        worker.run()
    except Interrupted:
        return
    except EtlError as error:
        worker.shared.request_stop(fatal=True)
        log.debug("fatal error", exc_info=True)
        raise EtlError(str(error)) from None
    except Exception as error:  # a bug: stop everything, keep the traceback in the log
        worker.shared.request_stop(fatal=True)
        log.error("unexpected error in worker", exc_info=True)
        raise EtlError(f"unexpected error in worker w{worker.number}: {type(error).__name__}: {error}") from None
    finally:
        worker.shared.set_busy(False)
