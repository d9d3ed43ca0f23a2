"""--batch-api: embed through OpenAI's Batch API, at half the price, resumable across kills.

One process, one loop, no pool: land the table's batches that have ended, submit the NULL
rows not in a pending batch (`--batch-rows` rows a batch, `--batch-size` inputs a request
line), then poll every --poll-seconds and land each batch as it ends (the same binary COPY
and IS NULL guard as a normal run, one commit per chunk). What a batch holds is committed in
PostgreSQL (etl_batches, etl_batch_rows) before it is created, and its key goes into the
batch's metadata: a kill at any moment never pays twice, since a rerun finds the record and,
through the key, a batch created just before the kill.
"""

import contextlib
import json
import logging
import multiprocessing
import signal
import sys
import tempfile
import time
import uuid
from collections import namedtuple

import numpy as np
import psycopg2.extras
from psycopg2 import sql

from . import catalog, db, schema
from .driver import summary_line
from .errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_SIGTERM, ConfigError, FatalProviderError, ProviderError
from .providers import make_embedder, make_provider
from .providers.openai import decode_vector
from .ratelimit import RateLimiter
from .shared import SharedState
from .texts import fit, row_text
from .worker import Row, Worker, pack_requests

log = logging.getLogger(__name__)

TEXT_BYTES_PER_FILE = 150_000_000  # text per input file: under the 200 MB limit with the JSON around it
CLAIM_PAGE = 2_000
LAND_CHUNK_ROWS = 5_000  # rows per commit while a batch lands
ENDED = ("completed", "expired", "failed", "cancelled")  # a batch in these states changes no more
GIVEN_UP = ("batch_expired", "batch_cancelled")  # error-file codes of requests never run: submitted again

Record = namedtuple("Record", "key batch_id state rows attempts counts created age")


class Stop(BaseException):
    """SIGINT or SIGTERM: leave at once; the batches keep running at OpenAI. (A BaseException,
    like KeyboardInterrupt, so that no `except Exception` in the SDK or HTTP library turns it
    into a connection error.)"""


@contextlib.contextmanager
def api(what):
    """The SDK's errors, wrapped once (its own retries cover the transient ones)."""
    import openai

    try:
        yield
    except openai.APIError as error:
        raise ProviderError(f"{what} failed: {str(error).splitlines()[0][:300]}") from error


def make_client(settings):
    import openai

    return openai.OpenAI(api_key=settings.api_key, base_url=settings.base_url, timeout=settings.request_timeout)


class BatchRun:
    """The batches of one table: submit, poll, land, resubmit; counts for the summary."""

    def __init__(self, settings, conn, target):
        self.settings, self.conn, self.target = settings, conn, target
        self.table = target.qualified_name
        self.store = db.WorkerStore(conn, target, "", settings.retry_failed, skip_batched=True)
        self.client = make_client(settings)
        self._worker = None  # the normal endpoint, opened for the few rows a batch refused
        self.keys = {"column_name": target.embedding_column, "run_id": ""}
        self.identity = catalog.column_identity(settings, target)
        self.provider = make_provider(settings, target.dimensions)  # what a request line says
        self.totals = dict(embedded=0, failed=0, tokens=0, requests=0, retries=0, rate_limited=0, truncated=0)
        self.submitted = self.landed = 0
        self.counts = {}  # key -> (completed, total) at the last poll

    def close(self):
        self.client.close()
        if self._worker is not None:
            self._worker.close()
            for name, value in self._worker.shared.totals().items():
                if name in self.totals:
                    self.totals[name] += value

    # --- PostgreSQL ------------------------------------------------------------------------------
    def execute(self, name, **params):
        cur = self.conn.cursor()
        slots = {}
        if name == "batch_claim":
            skip = sql.SQL("") if self.settings.retry_failed else self.target.query("skip_failures")
            slots = {"skip_failures": skip, "skip_claimed": self.target.query("skip_claimed")}
        cur.execute(self.target.query(name, **slots), {"table_name": self.table, **params})
        return cur

    def update(self, key, **fields):
        """Set fields of one etl_batches row and commit."""
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in fields
        )
        query = sql.SQL("UPDATE etl_batches SET {}, updated = now() WHERE key = %(key)s").format(assignments)
        with self.conn.cursor() as cur:
            cur.execute(query, {**fields, "key": key})
        self.conn.commit()

    def pending(self):
        records = [Record(*row) for row in self.execute("batch_pending").fetchall()]
        self.conn.rollback()
        return records

    def release(self, key, row_ids=None, unplaced_only=False):
        self.execute("batch_release", key=key, row_ids=row_ids, unplaced_only=unplaced_only).close()

    # --- submit ----------------------------------------------------------------------------------
    def submit_new(self):
        """Claim the NULL rows not in a pending batch, --batch-rows at a time; record each batch's rows, create it."""
        after, left, exhausted = None, self.settings.limit, False
        limit = self.settings.input_token_limit
        while not exhausted and left != 0:
            want = min(left or self.settings.batch_rows, self.settings.batch_rows)
            row_ids, failures, size = [], [], 0
            while not exhausted and size <= TEXT_BYTES_PER_FILE and len(row_ids) + len(failures) < want:
                asked = min(CLAIM_PAGE, want - len(row_ids) - len(failures))
                page = self.execute("batch_claim", after=after, limit=asked, **self.keys).fetchall()
                exhausted = len(page) < asked
                for row_id, digest, *values in page:
                    text = row_text(values)
                    size += len(text.encode("utf-8"))
                    if size > TEXT_BYTES_PER_FILE:  # this row starts the next batch
                        exhausted = False
                        break
                    after = row_id
                    if not text:
                        failures.append((row_id, "empty text", 1))
                    elif not self.settings.truncate and fit(text, limit, False)[2]:
                        failures.append(
                            (row_id, f"input is over the model's limit of {limit} tokens (--no-truncate)", 1)
                        )
                    else:
                        row_ids.append((row_id, digest))
            self.store.record_failures(failures)
            self.totals["failed"] += len(failures)
            left = None if left is None else left - len(row_ids) - len(failures)
            key = f"embedfill-{uuid.uuid4().hex[:20]}"
            if row_ids:  # a row another run put into its batch meanwhile stays out of this one
                with self.conn.cursor() as cur:
                    rows = [(self.table, row_id, key, digest) for row_id, digest in row_ids]
                    sql_text = db.load_sql("batch_add_rows")
                    row_ids = psycopg2.extras.execute_values(cur, sql_text, rows, page_size=5000, fetch=True)
                    cur.execute(
                        db.load_sql("batch_record"), {"key": key, "table_name": self.table, "row_count": len(row_ids)}
                    )
                    catalog.record_column(cur, self.target, self.identity)  # with the batch that pays for vectors
            self.conn.commit()
            if row_ids:
                self.create(key, 1)

    def create(self, key, attempt):
        """Build the batch's file from its rows, upload it, create the batch; each step committed first."""
        with tempfile.TemporaryFile() as file:
            if not self.write_file(key, file):
                self.update(key, state="landed")  # every row was filled or deleted meanwhile
                return
            file.seek(0)
            with api("uploading a batch file"):
                uploaded = self.client.files.create(file=(f"{key}.jsonl", file), purpose="batch", timeout=600)
        self.update(key, input_file_id=uploaded.id)
        metadata = {"embedfill_key": key, "embedfill_attempt": str(attempt), "embedfill_table": self.table[:500]}
        with api("creating a batch"):
            batch = self.client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", metadata=metadata
            )
        self.update(key, batch_id=batch.id, state=batch.status)
        self.submitted += 1
        log.info("submitted batch %s (%s)", key, batch.id)

    def write_file(self, key, file):
        """The JSONL request lines of a batch's rows; their places are committed. Returns the rows placed."""
        limit, size = self.settings.input_token_limit, self.settings.batch_size
        places, chunk, numbers = [], [], iter(range(1 << 31))

        def flush():
            for rows in pack_requests(chunk):
                number = next(numbers)
                places.extend((self.table, row.row_id, number, position) for position, row in enumerate(rows))
                line = self.provider.batch_line(f"{key}:{number}", [row.text for row in rows])
                file.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
            chunk.clear()

        with self.conn.cursor(name="batch_rows") as cur:
            cur.itersize = 2000
            cur.execute(self.target.query("batch_rows_text"), {"table_name": self.table, "key": key, "row_ids": None})
            for row_id, _, *values in cur:
                text = row_text(values)
                if text:
                    fitted, tokens, cut = fit(text, limit, exact=False)
                    self.totals["truncated"] += cut
                    chunk.append(Row(row_id, fitted, tokens))
                if len(chunk) == size:
                    flush()
        flush()
        self.execute("batch_unplace", key=key).close()
        with self.conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, db.load_sql("batch_place"), places, page_size=5000)
        self.release(key, unplaced_only=True)  # filled, deleted or emptied since they were claimed
        self.conn.commit()
        return len(places)

    def resume(self, create=True):
        """Records without a batch id: adopt the batch created just before a kill, else create it."""
        records = [record for record in self.pending() if record.batch_id is None]
        if not records:
            return
        found, oldest = {}, min(record.created for record in records) - 600
        with api("listing batches"):
            for batch in self.client.batches.list(limit=100):  # newest first, page after page
                if batch.created_at < oldest:
                    break
                meta = batch.metadata or {}
                found.setdefault((meta.get("embedfill_key"), meta.get("embedfill_attempt")), batch)
        for record in records:
            batch = found.get((record.key, str(record.attempts)))
            if batch is not None:
                log.info("batch %s was created before the run stopped: adopting %s", record.key, batch.id)
                self.update(record.key, batch_id=batch.id, input_file_id=batch.input_file_id, state=batch.status)
            elif create:
                self.create(record.key, record.attempts)

    # --- wait and land ---------------------------------------------------------------------------
    def poll(self):
        """Look at every pending batch once, landing those that ended. Returns what is still pending."""
        for record in self.pending():
            if record.batch_id is not None:
                self.check(record)
        return self.pending()

    def wait(self):
        while True:
            pending = self.poll()
            rows = self.execute("batch_rows_pending").fetchone()[0]
            self.conn.rollback()
            completed, total = (sum(counts) for counts in zip((0, 0), *self.counts.values()))
            log.info(
                "batches pending=%d done=%d rows pending=%d done=%d request_counts completed/total=%d/%d",
                len(pending), self.landed, rows, self.totals["embedded"], completed, total,
            )  # fmt: skip
            if not pending:
                return
            time.sleep(self.settings.poll_seconds)

    def check(self, record):
        with api(f"retrieving batch {record.batch_id}"):
            batch = self.client.batches.retrieve(record.batch_id)
        counts = batch.request_counts
        described = counts and f"{counts.completed}/{counts.total} failed={counts.failed}"
        if batch.status not in ENDED:
            self.counts[record.key] = (counts.completed, counts.total) if counts else (0, 0)
            self.update(record.key, state=batch.status, request_counts=described)
            return
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                self.land(record.key, file_id)
        self.counts.pop(record.key, None)
        left = [row[0] for row in self.execute("batch_rows_text", key=record.key, row_ids=None).fetchall()]
        if left and batch.status in ("expired", "failed") and record.attempts < 2:
            log.warning("batch %s %s: submitting its %d rows left again", batch.id, batch.status, len(left))
            self.update(record.key, attempts=record.attempts + 1, batch_id=None, input_file_id=None, state="submitting")
            self.create(record.key, record.attempts + 1)
            return
        if left and batch.status in ("expired", "failed"):
            reason = f"batch {batch.id} {batch.status} on attempt {record.attempts}"
            self.store.record_failures([(row_id, reason, record.attempts) for row_id in left])
            self.totals["failed"] += len(left)
        self.release(record.key)  # rows of a completed or cancelled batch left NULL: a later run takes them
        state = {"completed": "landed", "cancelled": "cancelled"}.get(batch.status, "failed")
        self.update(record.key, state=state, request_counts=described)
        self.landed += 1
        log.info("batch %s %s: %s", record.key, batch.status, state)

    def land(self, key, file_id):
        """Place every vector of an output (or error) file by custom_id and index, a chunk per commit."""
        places = {(request, position): (row_id, digest) for request, position, row_id, digest in self.execute(
            "batch_places", key=key)}  # fmt: skip
        self.conn.rollback()
        ids, vectors, refused = [], [], {}
        with api(f"reading file {file_id}"), self.client.files.with_streaming_response.content(file_id) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                request = int(item["custom_id"].rsplit(":", 1)[1])
                answer, error = item.get("response") or {}, item.get("error") or {}
                if answer.get("status_code") == 200 and not error:
                    body = answer["body"]
                    self.totals["tokens"] += int((body.get("usage") or {}).get("prompt_tokens") or 0)
                    self.totals["requests"] += 1
                    for data in body["data"]:
                        place = places.pop((request, data["index"]), None)
                        if place is not None:  # None: landed before a kill
                            ids.append(place)
                            vectors.append(decode_vector(data["embedding"]))
                    if len(ids) >= LAND_CHUNK_ROWS:
                        self.write(key, ids, vectors)
                        ids, vectors = [], []
                elif error.get("code") not in GIVEN_UP:
                    refused[request] = error.get("message") or ((answer.get("body") or {}).get("error") or {}).get(
                        "message"
                    )
        self.write(key, ids, vectors)
        if refused:
            row_ids = [row_id for (request, _), (row_id, _) in places.items() if request in refused]
            log.warning("%d rows in %d refused requests of the batch: sending them through the normal endpoint "
                        "(first reason: %s)", len(row_ids), len(refused), next(iter(refused.values())))  # fmt: skip
            self.resend(key, row_ids)

    def write(self, key, places, vectors, failures=()):
        """Write vectors where each row is still NULL with the text that was sent, record failures,
        take the rows out of the batch, commit. `places`: [(row_id, text hash)], one per vector."""
        ids, hashes = [row_id for row_id, _ in places], [digest for _, digest in places]
        matrix = None
        if ids:
            matrix = np.vstack(vectors)
            expected = self.target.dimensions or self.settings.dimensions
            if expected and matrix.shape[1] != expected:
                raise FatalProviderError(
                    f"{self.target.display}.{self.target.embedding_column} expects {expected} dimensions but "
                    f"{self.settings.model} returned {matrix.shape[1]}; check EMBEDDING_DIMENSIONS"
                )
        self.release(key, ids + [row_id for row_id, _, _ in failures])
        written, failed, _ = self.store.write(ids, hashes, matrix, failures)
        self.totals["embedded"] += written
        self.totals["failed"] += len(failed)
        for row_id, reason, _ in failed:
            log.warning("row %s failed: %s", row_id, reason)

    def resend(self, key, row_ids):
        """Rows of requests the batch refused, through the normal endpoint and the backfill's own
        request path (its retries, its split to isolate the rows refused)."""
        rows = self.execute("batch_rows_text", key=key, row_ids=row_ids).fetchall()
        self.conn.rollback()
        texts = [(row_id, digest, row_text(values)) for row_id, digest, *values in rows]
        hashes = {row_id: digest for row_id, digest, _ in texts}
        fitted = [Row(row_id, *fit(text, self.settings.input_token_limit)[:2]) for row_id, _, text in texts if text]
        worker = self.worker()
        embedded, failures = [], [(row_id, "empty text", 1) for row_id, _, text in texts if not text]
        for chunk in pack_requests(fitted):
            ok, failed = worker.embed_rows(chunk)
            embedded += ok
            failures += failed
        places = [(row.row_id, hashes[row.row_id]) for chunk, _ in embedded for row in chunk]
        self.write(key, places, [vectors for _, vectors in embedded], failures)

    def worker(self):
        """A Worker without a database, in this process: the normal endpoint for the few rows a batch refused."""
        if self._worker is None:
            context = multiprocessing.get_context("fork")
            shared = SharedState(context, 1)
            shared.register_worker()
            limiter = RateLimiter(context, self.settings.rpm, self.settings.tpm, 1)
            embedder = make_embedder(self.settings, self.target.dimensions)
            self._worker = Worker(self.settings, self.target, [], shared, limiter, context.Semaphore(1), 0, embedder)
        return self._worker


def _open(settings):
    provider = make_provider(settings)
    if provider.batch_endpoint is None:
        raise ConfigError("--batch-api needs the OpenAI API: set ETL_PROVIDER=openai")
    provider.check()
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        catalog.guard_column(conn, settings, target)  # the record is made with the first batch (submit_new)
        return BatchRun(settings, conn, target)
    except BaseException:
        conn.close()
        raise


def run_batches(settings, out=None):
    """`python etl.py --batch-api`: land, submit, then wait and land (unless --no-wait); the exit code."""
    out = out or sys.stdout
    started = time.monotonic()
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        raise Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    run = None
    try:
        run = _open(settings)
        run.resume()
        run.poll()
        run.submit_new()
        if not settings.no_wait:
            run.wait()
    except Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run is not None:
            run.close()
            run.conn.close()
    if run is None:  # a signal before the database answered
        return EXIT_SIGINT if received[0] == signal.SIGINT else EXIT_SIGTERM
    print(summary_line(settings, run.totals, time.monotonic() - started, 0), file=out, flush=True)
    log.info("batches submitted=%d ended=%d", run.submitted, run.landed)
    if received:
        log.warning(
            "interrupted by %s: the batches keep running at OpenAI; rerun the same command to land them",
            signal.Signals(received[0]).name,
        )
        return EXIT_SIGINT if received[0] == signal.SIGINT else EXIT_SIGTERM
    if settings.no_wait and run.submitted:
        log.info("%d batches submitted; rerun the same command (or without --no-wait) to land them", run.submitted)
    if run.totals["failed"]:
        log.warning(
            "%d rows could not be embedded; each is recorded in etl_failures "
            "(`python etl.py status` shows why; rerun with --retry-failed to try them again)",
            run.totals["failed"],
        )
        return EXIT_PARTIAL
    return EXIT_OK


def cancel_batches(settings, out):
    """`python etl.py batches cancel`: cancel this table's pending batches and release their rows."""
    run = _open(settings)
    try:
        run.resume(create=False)  # a batch created just before a kill is cancelled too
        pending = run.pending()
        for record in pending:
            if record.batch_id is None:  # never created: nothing runs at OpenAI
                run.release(record.key)
                run.update(record.key, state="cancelled")
                print(f"cancelled {record.key} (never created) rows={record.rows}", file=out)
                continue
            with api(f"cancelling batch {record.batch_id}"):
                batch = run.client.batches.retrieve(record.batch_id)
                if batch.status == "completed":
                    print(
                        f"batch {record.key} {batch.id} completed: not cancelled (rerun --batch-api to land it)",
                        file=out,
                    )
                    continue
                if batch.status not in ENDED:
                    batch = run.client.batches.cancel(record.batch_id)
            run.release(record.key)
            run.update(record.key, state="cancelled")
            print(f"cancelled {record.key} {batch.id} was {batch.status} rows={record.rows}", file=out)
        if not pending:
            print(f"no pending batches for {run.target.display}", file=out)
    finally:
        run.close()
        run.conn.close()
    return EXIT_OK


def status_lines(conn, target):
    """One line per pending batch of the table, from PostgreSQL alone (no API call)."""
    if not catalog.scalar(conn, "SELECT to_regclass('etl_batches') IS NOT NULL"):
        return []
    with conn.cursor() as cur:
        cur.execute(db.load_sql("batch_pending"), {"table_name": target.qualified_name})
        records = [Record(*row) for row in cur.fetchall()]
    conn.rollback()
    return [
        f"batch {r.key} id={r.batch_id or '-'} state={r.state} age={r.age} rows={r.rows} "
        f"request_counts={r.counts or '-'} attempt={r.attempts}"
        for r in records
    ]
