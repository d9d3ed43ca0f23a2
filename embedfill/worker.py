"""The worker: a pool process that embeds id ranges batch by batch and commits each batch.

Ranges come from a queue in shared memory (an index into the planner's list), so a worker
that finishes early takes the next range.

Each process runs LANES lanes (threads), each with its own connection and its own loop of
claim, embed, write, commit. A gate lets one request per process be in flight at a time, so
`--workers N` still means N concurrent requests; while one lane waits on the API, the other
decodes its answer, writes, commits and claims its next batch, and its request goes out as
soon as the first answer's bytes are in. Row locks stay with the lane (and transaction) that
embeds the rows.

`init_worker` and `embed_ranges` are top-level functions so the pool can pickle them. Each
lane opens its own database connection and each process its own API client on its first
range; nothing that holds a socket crosses the fork (the SSL context the parent builds for
them holds none).
"""

import logging
import multiprocessing.util
import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import psycopg2

from . import db, logs
from .embedders import make_embedder
from .errors import (DatabaseError, EtlError, FatalProviderError, InvalidInputError, TransientProviderError)
from .models import DEFAULT_DIMENSIONS, MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST, model_info
from .tokens import fit

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A worker that has never embedded anything and sees this many single inputs refused is
# misconfigured (a `dimensions` the model does not take, say), not unlucky.
REFUSALS_BEFORE_FATAL = 3
LANES = 2  # per worker process: one waits on the API while the other uses the database
BIG_ANSWER_BYTES = 16 << 20  # answers over this are decoded inside the gate (see tune_malloc)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


class Interrupted(Exception):
    """A stop was requested while this batch waited: roll it back and leave."""


@dataclass
class Row:
    row_id: str
    text: str
    tokens: int = 0


def row_text(values):
    """The non-NULL, non-blank column values in order, joined by newlines, otherwise unchanged."""
    return "\n".join(value for value in values if value is not None and value.strip())


class Gate:
    """What the lanes of one process share: the lock that keeps one request in flight, and
    the API client (one HTTP connection per worker, whatever its lanes)."""

    def __init__(self, settings, target, tls=None):
        self.settings = settings
        self.target = target
        self.tls = tls
        self.big_answers = answer_bytes(settings, target) > BIG_ANSWER_BYTES
        self.lock = threading.Lock()
        self._made = threading.Lock()
        self._embedder = None

    def embedder(self):
        with self._made:
            if self._embedder is None:
                self._embedder = make_embedder(self.settings, self.target.dimensions, self.tls)
            return self._embedder

    def close(self):
        if self._embedder is not None:
            self._embedder.close()


class Worker:
    """One lane of a worker process: settings, shared memory, the process's request gate and
    (once opened) its own connection and client."""

    def __init__(self, settings, target, ranges, shared, limiter, number, lane, gate):
        self.settings = settings
        self.target = target
        self.ranges = ranges
        self.shared = shared
        self.limiter = limiter
        self.number = number
        self.lane = lane
        self.gate = gate
        self.store = None
        self.embedder = None
        self.succeeded = 0
        self.refused = 0

    # --- lifetime --------------------------------------------------------------------------
    def open(self):
        if self.store is None:
            self.store = self._connect()
        if self.embedder is None:
            self.embedder = self.gate.embedder()

    def _connect(self):
        # w<N>p<pid>.<lane>: status counts processes (lane suffix dropped), two runs apart (pid)
        name = f"{db.APPLICATION_PREFIX}:{self.target.qualified_name}:w{self.number}p{os.getpid()}.{self.lane}"
        conn = db.connect(self.settings.database_url, application_name=name)
        return db.WorkerStore(conn, self.target, self.settings.retry_failed)

    def close(self):
        if self.store is not None:
            self.store.close()

    # --- the ranges ----------------------------------------------------------------------------
    def run(self):
        """Walk ranges from the shared queue until none is left, one transaction per batch.

        A batch may draw from several ranges, so every request but the last is full. When a
        lost connection rolls a batch back, the ranges it drew from are walked again from
        where the batch started."""
        retry, current, done = [], None, False
        size = self.settings.batch_size
        while not done and not self.shared.stopping():
            batch, touched, reserved = [], [], 0
            try:
                while len(batch) < size:
                    if current is None:
                        current = retry.pop(0) if retry else self._take_range()
                        if current is None:
                            done = True
                            break
                    granted = self.shared.reserve_rows(size - len(batch))
                    if granted == 0:  # --limit reached
                        done = True
                        break
                    touched.append(tuple(current))
                    rows = self.store.claim(current[0], current[1], granted)
                    self.shared.release_rows(granted - len(rows))
                    reserved += len(rows)
                    batch.extend(rows)
                    current = [rows[-1][0], current[1]] if len(rows) == granted else None
                counts = self.process_batch(batch) if batch else (0, 0, 0)
                self.store.commit()
            except Interrupted:
                self.store.rollback()
                self.shared.release_rows(reserved)
                return
            except psycopg2.Error as error:
                if self.store.alive():  # an error in SQL, not in the connection: stop
                    raise DatabaseError(f"database error on {self.target.display}: {db.first_line(error)}") from error
                self.shared.release_rows(reserved)
                self._reconnect(error)
                retry = [list(segment) for segment in touched] + retry
                current, done = None, False
                continue
            written, failed, truncated = counts
            self.shared.add(embedded=written, failed=failed, truncated=truncated)

    def _take_range(self):
        index = self.shared.take_range()
        return list(self.ranges[index]) if index < len(self.ranges) else None

    def _reconnect(self, error):
        window = self.settings.reconnect_seconds
        log.warning("lost the database connection (%s); reconnecting for up to %.0f s", db.first_line(error), window)
        self.store.close()
        self.store = None
        waited = 0.0
        delay = 0.5
        while waited < window:
            if self.shared.sleep(delay):
                raise Interrupted()
            waited += delay
            try:
                self.store = self._connect()
                log.info("reconnected to the database")
                return
            except DatabaseError:
                delay = min(delay * 2, 5.0)
        raise DatabaseError(
            f"lost the database connection and could not reconnect within {window:.0f} s "
            f"({db.first_line(error)}); check the server, then rerun to resume"
        )

    # --- one batch -----------------------------------------------------------------------------
    def process_batch(self, claimed):
        """Embed the claimed rows, write their vectors, record the rows that failed.

        Returns (rows written, rows failed, inputs truncated); the caller commits."""
        failures = []
        rows = []
        truncated = 0
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
            matrix = blocks[0] if len(blocks) == 1 else np.vstack(blocks)
            self.check_dimensions(matrix.shape[1])
            finite = np.isfinite(matrix).all(axis=1)
            if not finite.all():
                failures.extend((row_id, "the API returned a vector with NaN or infinity", 1)
                                for row_id, ok in zip(ids, finite) if not ok)
                ids = [row_id for row_id, ok in zip(ids, finite) if ok]
                matrix = matrix[finite]
            written = self.store.write(ids, matrix)
        self.store.record_failures(failures)
        for row_id, reason, _ in failures:
            log.warning("row %s failed: %s", row_id, reason)
        return written, len(failures), truncated

    def check_dimensions(self, width):
        expected = self.target.dimensions or self.settings.dimensions
        if expected and width != expected:
            if self.target.dimensions:
                raise FatalProviderError(
                    f"{self.target.display}.{self.target.embedding_column} is vector({expected}) but "
                    f"{self.settings.model_name} returned {width} dimensions; set EMBEDDING_DIMENSIONS={expected} "
                    "or change the column"
                )
            raise FatalProviderError(
                f"EMBEDDING_DIMENSIONS is {expected} but {self.settings.model_name} returned {width} dimensions; "
                "the model or server ignores `dimensions`"
            )

    def embed_rows(self, rows):
        """([(rows, vectors)], failures) for one request's rows, retrying and splitting as needed."""
        attempt = 0
        texts = [row.text for row in rows]
        tokens = sum(row.tokens for row in rows)
        while True:
            try:
                # One request in flight per process: the gate is held from the budget to the
                # answer's last byte; back-offs happen outside it, and decoding too unless the
                # answers are big (two lanes decoding 33 MB answers at once hold twice the memory).
                with self.gate.lock:
                    self.wait_for_budget(tokens)
                    answer = self.embedder.fetch(texts)
                    result = self.embedder.decode(answer) if self.gate.big_answers else None
                if result is None:
                    result = self.embedder.decode(answer)
            except TransientProviderError as error:
                attempt += 1
                self.shared.add(retries=1, rate_limited=int(error.rate_limited), requests=1)
                delay = error.retry_after
                if delay is None:
                    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))  # full jitter
                if error.rate_limited:
                    self.limiter.pause(delay)
                if attempt >= self.settings.max_attempts:
                    reason = f"gave up after {attempt} attempts: {error}"
                    return [], [(row.row_id, reason, attempt) for row in rows]
                log.info("%s; attempt %d of %d in %.1f s", error, attempt + 1, self.settings.max_attempts, delay)
                if self.shared.sleep(delay):
                    raise Interrupted()
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
            self.shared.add(requests=1, tokens=result.tokens)
            self.limiter.observe(result.headers, tokens)
            return [(rows, result.vectors)], []

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


_lanes = []


def init_worker(settings, target, ranges, shared, limiter, tls=None):
    """Pool initializer: runs once in each new worker process."""
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop. SIGTERM
    # from the parent (pool.terminate after the grace period) ends the process: its open
    # transactions are rolled back by PostgreSQL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tune_malloc(answer_bytes(settings, target))
    number = shared.register_worker()
    logs.set_process_name(f"w{number}")
    gate = Gate(settings, target, tls)
    _lanes[:] = [Worker(settings, target, ranges, shared, limiter, number, lane, gate) for lane in range(LANES)]
    for lane in _lanes:
        multiprocessing.util.Finalize(lane, lane.close, exitpriority=10)
    multiprocessing.util.Finalize(gate, gate.close, exitpriority=5)


def answer_bytes(settings, target):
    """About how big the largest answer of this run is: float32 vectors in base64."""
    info = model_info(settings.model_name)
    dimensions = target.dimensions or settings.dimensions or (info.dimensions if info else DEFAULT_DIMENSIONS)
    return min(settings.batch_size, MAX_INPUTS_PER_REQUEST) * dimensions * 4 * 4 // 3


def tune_malloc(largest_answer):
    """Answers, their text and the vector matrices come and go every batch: 4 MB each at
    batch 500 with 1536 dimensions, 33 MB at batch 2048 with 3072. Buffers mapped fresh for
    each batch, or trimmed off the heap once freed, are page-faulted in again every batch.

    Measured on 2026-11-24 with the bench's `run_etl` (getrusage of etl.py and its workers,
    start-up included) in one-off runs of the DB-bound case, 2 workers × 500, CPU a row:
    glibc's defaults 46 µs; every buffer over 1 MB mapped fresh 69 µs; one arena for both
    lanes, buffers up to 8 MB kept in it and up to 16 MB of free heap kept: 37 µs, peak RSS
    82-88 MB. Answers over 16 MB (batch 2048 × 3072 dims) would keep that much more in each
    process, so there every buffer from 1 MB up is mapped and handed back at once, and the
    answer is decoded inside the request gate (peak RSS 177 MB in five runs, 175-217 MB
    without these two, at 15-25% more CPU). glibc only; elsewhere nothing changes."""
    if largest_answer > BIG_ANSWER_BYTES:
        parameters = ((M_MMAP_THRESHOLD, 1 << 20),)
    else:
        parameters = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 8 << 20), (M_TRIM_THRESHOLD, 16 << 20))
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for parameter, value in parameters:
        mallopt(parameter, value)


def embed_ranges(_task):
    """Pool task (one per worker): run the lanes until no range is left.
    Fatal errors stop every worker and reach the parent."""
    shared = _lanes[0].shared
    if shared.stopping():
        return
    shared.set_busy(True)
    try:
        errors = []
        others = [threading.Thread(target=_run_lane, args=(lane, errors), name=f"lane{lane.lane}", daemon=True)
                  for lane in _lanes[1:]]
        for thread in others:
            thread.start()
        _run_lane(_lanes[0], errors)
        for thread in others:
            thread.join()
        if errors:
            raise errors[0]
    finally:
        shared.set_busy(False)


def _run_lane(lane, errors):
    """One lane's loop; a fatal error stops every worker and is kept for the parent."""
    try:
        lane.open()
        lane.run()
    except Interrupted:
        return
    except EtlError as error:
        lane.shared.request_stop(fatal=True)
        log.debug("fatal error", exc_info=True)
        errors.append(EtlError(str(error)))
    except Exception as error:  # a bug: stop everything, keep the traceback in the log
        lane.shared.request_stop(fatal=True)
        log.error("unexpected error in worker", exc_info=True)
        errors.append(EtlError(f"unexpected error in worker w{lane.number}: {type(error).__name__}: {error}"))
