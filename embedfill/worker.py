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
import multiprocessing.util
import os
import random
import signal
import threading
import time
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
# With no request of the run answered yet, this many single inputs refused in one batch that
# nothing of succeeded (or this many in all) mean the API refuses everything (a `dimensions` the
# model does not take, say): the run stops instead of recording rows that are not at fault.
REFUSALS_BEFORE_FATAL = 3
REFUSALS_CAP = 64
UNREACHABLE_SECONDS = 5.0  # no connection to the API at all since the run started: stop
HALF_MAX = 65504.0  # the largest finite float16: halfvec stores nothing beyond it
PARENT_CHECK_SECONDS = 0.5
PROBE_TEXT = "embedfill: is the server answering?"  # a few tokens, sent before a row is blamed for a server error


def process_count(workers):
    """Pool processes for --workers requests in flight: the spare ones decode, write and claim
    while the others wait on the API. At least four: with three, a DB-bound run of two
    workers waits on its own writes (bench/RESULTS.md)."""
    return max(4, workers + max(1, workers // 4))


class Interrupted(Exception):
    """A stop was requested while this batch waited: leave it (its claims go with the run's lease)."""


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

    def __init__(
        self, settings, target, ranges, shared, limiter, requests, number, embedder, run_id=None, identity=None
    ):
        self.settings = settings
        self.target = target
        self.ranges = ranges
        self.shared = shared
        self.limiter = limiter
        self.requests = requests  # the run-wide semaphore: --workers requests in flight
        self.number = number
        self.run_id = run_id
        self.identity = identity  # what the column's record must say (confirmed by the first write)
        self.store = None
        self.embedder = embedder  # built in the parent, unused there: this process's own copy
        self.refused = 0  # single inputs refused in the batch at hand
        self.db_retries = 0
        self.lost_since = None  # when the database connection was lost, until a write succeeds again
        self.warned_at = -60.0
        self.stops_others = True  # a fatal answer stops the run's other processes (verify reads each page's own)

    # --- lifetime --------------------------------------------------------------------------
    def open(self):
        if self.store is None:
            self.store = self._connect()

    def _connect(self, timeout=10):
        # r<pid of the run>w<N>: `status` counts runs and their processes (sql/status_active.sql)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:r{os.getppid()}w{self.number}"
        conn = db.connect(self.settings.database_url, application_name=name, timeout=timeout)
        try:
            return db.WorkerStore(conn, self.target, self.run_id, self.settings.retry_failed)
        except psycopg2.Error as error:
            conn.close()
            raise DatabaseError(f"cannot prepare a worker's session: {db.explain(error)}") from error

    def close(self):
        if self.store is not None:
            self.store.close()
        self.embedder.close()

    # --- the ranges ----------------------------------------------------------------------------
    def run(self):
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
            except Interrupted:
                self.shared.release_rows(reserved)
                return
            cursor.commit()
            self.shared.add(**counts)

    def _claim(self, cursor):
        """The next batch's rows, claimed and committed: ([(row_id, hash, *texts)], rows reserved under --limit)."""
        size = self.settings.batch_size
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
        except psycopg2.Error:
            self.shared.release_rows(reserved)
            raise
        self.db_retries, self.lost_since = 0, None
        return batch, reserved

    def _take_range(self):
        index = self.shared.take_range()
        return tuple(self.ranges[index]) if index < len(self.ranges) else None

    def _recover(self, error):
        """A statement failed and rolled back: reopen a lost connection, retry a transient error
        (deadlock, serialization failure, lock or statement timeout) a few times, stop on anything else."""
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
        raise DatabaseError(f"database error on {self.target.display}: {db.explain(error)}") from error

    def _reconnect(self, error):
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
        self.store.close()
        self.store = None
        delay = 0.25
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DatabaseError(
                    f"lost the database connection and could not reconnect within {window:.0f} s "
                    f"({db.first_line(error)}); check the server, then rerun to resume"
                )
            if self.shared.sleep(min(delay, left)):
                raise Interrupted()
            try:
                self.store = self._connect(timeout=max(1.0, deadline - time.monotonic()))
                log.log(logging.INFO if said else logging.DEBUG, "reconnected to the database")
                return
            except DatabaseError:  # the server may drop again while we set up
                delay = min(delay * 2, 5.0)

    # --- one batch -----------------------------------------------------------------------------
    def process_batch(self, claimed):
        """Embed the claimed rows and write their vectors (with the rows that failed recorded and
        the claims released) in one short transaction. Returns the counts for the shared totals."""
        failures, rows, truncated, hashes = [], [], 0, {}
        limit = self.settings.input_token_limit
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

        self.refused = 0
        ids, blocks = [], []
        for chunk in pack_requests(rows, self.limiter.max_inputs()):
            embedded, failed = self.embed_rows(chunk)
            failures.extend(failed)
            for chunk_rows, vectors in embedded:
                ids.extend(row.row_id for row in chunk_rows)
                blocks.append(vectors)
        if self.refused >= REFUSALS_BEFORE_FATAL and not ids and self.limiter.successes() == 0:
            self._refuses_everything(failures[-1][1])
        matrix = None
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
        written, failed, left = self.write(ids, [hashes[row_id] for row_id in ids], matrix, failures)
        for row_id, reason, _ in failed:
            log.warning("row %s failed: %s", row_id, reason)
        return {"embedded": written, "failed": len(failed), "truncated": truncated, "left": sum(left.values())}

    def write(self, ids, hashes, matrix, failures):
        """store.write, again after a lost connection or a transient error: the vectors are kept, not
        paid for again (the claims are still this run's, and the write checks every row anew)."""
        while True:
            try:
                result = self.store.write(ids, hashes, matrix, failures, self.identity)
                self.db_retries, self.lost_since = 0, None
                return result
            except psycopg2.Error as error:
                self._recover(error)

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
        """([(rows, vectors)], failures) for one request's rows. A failure that is the server's (a
        429, 5xx, timeout, lost connection) is waited out, never put on the rows, until no request
        of the run has succeeded for --stall-seconds. A timeout sends the rows again as two halves
        (and caps every process's requests); a refusal is split down to the row refused alone; so is
        a request that keeps failing (--max-attempts), and a row that then still fails alone while
        the server answers a probe is the one at fault."""
        attempt = limited = 0
        probed = False
        tokens = sum(row.tokens for row in rows)
        while True:
            try:
                result = self._request([row.text for row in rows], tokens, limited)
            except TransientProviderError as error:
                self.shared.add(retries=1, rate_limited=int(error.rate_limited), requests=1)
                stall_left = self._stall_left(error)
                if error.rate_limited:  # "not now", never "this row is bad": no attempt is spent
                    limited += 1
                    delay = min(self.limiter.cooldown_left(), stall_left)
                else:
                    self._check_reachable(error)
                    if error.kind == "timeout" and len(rows) > 1:
                        return self._split(rows, error)
                    attempt += 1
                    if attempt >= self.settings.max_attempts:
                        if len(rows) > 1:
                            return self._split(rows)  # the halves tell a server that is down from a bad row
                        if probed:
                            reason = f"the server fails on this input ({attempt} attempts) but answers others: {error}"
                            return [], [(rows[0].row_id, reason, attempt)]
                        probed = self._server_answers()
                        if probed:
                            continue  # once more, at once (on a fresh connection), before blaming the row
                    delay = min(backoff(attempt) if error.retry_after is None else error.retry_after, stall_left)
                log.info("%s; trying again in %.1f s", error, delay)
                if self.shared.sleep(delay):
                    raise Interrupted() from None
                continue
            except InvalidInputError as error:
                self.shared.add(requests=1)
                if len(rows) > 1:
                    return self._split(rows)
                self.refused += 1
                if self.refused >= REFUSALS_CAP and self.limiter.successes() == 0:
                    self._refuses_everything(error)
                return [], [(rows[0].row_id, f"refused by the API: {error}", 1)]
            self.shared.add(requests=1, tokens=result.tokens)
            return [(rows, result.vectors)], []

    def _request(self, texts, tokens, limited=0):
        """One request, within the run's budgets, holding one of the --workers slots from the budget
        to the answer's last byte (back-offs and decoding happen outside it)."""
        with self.requests:
            self.wait_for_budget(tokens)
            try:
                answer = self.embedder.fetch(texts)
            except TransientProviderError as error:
                if error.rate_limited:  # pause every worker before another one takes this slot,
                    wanted = backoff(limited + 1) if error.retry_after is None else error.retry_after
                    self.limiter.rate_limited(min(wanted, self._stall_left(error)))  # never past --stall-seconds
                raise
            except FatalProviderError:  # a bad key or model: stop before another process sends
                self._stop_others()
                raise
        result = self.embedder.decode(answer)
        self.limiter.succeeded()
        self.limiter.observe(self.embedder.quota(result.headers), result.tokens, tokens)
        return result

    def _server_answers(self):
        """Does the server answer a request of one short text now? (Then a row it keeps failing on is
        at fault, not the server.)"""
        try:
            result = self._request([PROBE_TEXT], 4)
        except (TransientProviderError, InvalidInputError):
            self.shared.add(requests=1)
            return False
        self.shared.add(requests=1, tokens=result.tokens)
        return True

    def _split(self, rows, timeout=None):
        """Send the rows as two halves (after a refusal or repeated failures, to isolate the row at
        fault; after a timeout, because the request was too big for the server's time: then every
        process's requests are capped)."""
        middle = len(rows) // 2
        if timeout is not None and self.limiter.cap_inputs(middle):
            log.warning(
                "a request of %d inputs timed out (%s): requests carry at most %d inputs from now on",
                len(rows),
                timeout,
                middle,
            )
        embedded, failed = [], []
        for half in (rows[:middle], rows[middle:]):
            for chunk in pack_requests(half, self.limiter.max_inputs()):  # a cap learned meanwhile applies
                ok, bad = self.embed_rows(chunk)
                embedded, failed = embedded + ok, failed + bad
        return embedded, failed

    def _refuses_everything(self, reason):
        self._stop_others()
        raise FatalProviderError(
            f"the API refuses every input ({reason}) and has answered no request of this run; "
            "check EMBEDDING_MODEL and EMBEDDING_DIMENSIONS"
        )

    def _check_reachable(self, error):
        """No connection to the API could be made since the run started: a wrong URL, or no network.
        Stop within a few seconds, naming the setting (the rows are not at fault)."""
        if error.kind != "unreachable" or self.limiter.successes() > 0:
            return
        if time.monotonic() - self.limiter["started"] < UNREACHABLE_SECONDS:
            return
        self._stop_others()
        setting = "AZURE_OPENAI_ENDPOINT" if self.settings.provider == "azure" else "OPENAI_BASE_URL"
        raise FatalProviderError(
            f"{error}; check {setting} (and the network): no request of this run has reached the API"
        ) from error

    def _stall_left(self, error):
        """Seconds left before no request of the run has succeeded for --stall-seconds (then it
        stops: waiting longer would not help, and no row is to blame)."""
        window = self.settings.stall_seconds
        stalled = self.limiter.stalled_for()
        if stalled >= window:
            self._stop_others()
            if error.rate_limited:
                raise FatalProviderError(
                    f"rate limited for {stalled:.0f} s with no request succeeding (--stall-seconds {window:g}): "
                    "another client may be using this key's quota; rerun when it is free, or lower --workers"
                ) from error
            raise FatalProviderError(
                f"no request has succeeded for {stalled:.0f} s (--stall-seconds {window:g}); the last error: "
                f"{error}. The server may be down or overloaded: rerun when it answers (nothing was recorded as failed)"
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


def pack_requests(rows, max_inputs=None):
    """Split rows into requests of at most 2048 inputs (or the cap learned in this run) and 300k
    tokens (the API's limits)."""
    most = min(MAX_INPUTS_PER_REQUEST, max_inputs or MAX_INPUTS_PER_REQUEST)
    chunk, chunk_tokens = [], 0
    for row in rows:
        if chunk and (len(chunk) >= most or chunk_tokens + row.tokens > MAX_TOKENS_PER_REQUEST):
            yield chunk
            chunk, chunk_tokens = [], 0
        chunk.append(row)
        chunk_tokens += row.tokens
    if chunk:
        yield chunk


def watch_parent(parent):
    """In a pool process: end it within PARENT_CHECK_SECONDS of its parent's death (a SIGKILL of the
    parent alone), so that nothing goes on sending requests with nobody to report to. Its connections
    close with it; its claims go with the run's lease."""

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_worker = None


def init_worker(settings, target, ranges, shared, limiter, requests, embedder, run_id, identity):
    """Pool initializer: runs once in each new worker process."""
    global _worker
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop. SIGTERM
    # from the parent (pool.terminate after the grace period) ends the process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(os.getppid())
    number = shared.register_worker()
    logs.set_process_name(f"w{number}")
    _worker = Worker(settings, target, ranges, shared, limiter, requests, number, embedder, run_id, identity)
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
