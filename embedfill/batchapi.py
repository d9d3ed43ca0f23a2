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
import tempfile
import uuid
from collections import namedtuple
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import psycopg2.extras
from psycopg2 import sql

from . import db, guard
from .errors import ProviderError
from .providers import make_provider
from .requester import Row, pack_requests
from .shape import Shape
from .store import WorkerStore
from .texts import fit, row_text

if TYPE_CHECKING:
    import openai
    from openai.types import Batch

    from .catalog import Target
    from .requester import Failure, Requester
    from .settings import Settings

log = logging.getLogger(__name__)

TEXT_BYTES_PER_FILE = 150_000_000  # text per input file: under the 200 MB limit with the JSON around it
CLAIM_PAGE = 2_000
LAND_CHUNK_ROWS = 5_000  # rows per commit while a batch lands
ENDED = ("completed", "expired", "failed", "cancelled")  # a batch in these states changes no more
GIVEN_UP = ("batch_expired", "batch_cancelled")  # error-file codes of requests never run: submitted again

Record = namedtuple("Record", "key batch_id state rows attempts counts created age")


@contextlib.contextmanager
def api(what: str) -> Iterator[None]:
    """The SDK's errors, wrapped once (its own retries cover the transient ones)."""
    import openai

    try:
        yield
    except openai.APIError as error:
        raise ProviderError(f"{what} failed: {str(error).splitlines()[0][:300]}") from error


def make_client(settings: "Settings") -> "openai.OpenAI":
    import openai

    return openai.OpenAI(api_key=settings.api_key, base_url=settings.base_url, timeout=settings.request_timeout)


class BatchRun:
    """The batches of one table: submit, poll, land, resubmit; counts for the summary."""

    def __init__(self, settings: "Settings", conn: db.Connection, target: "Target") -> None:
        self.settings, self.conn, self.target = settings, conn, target
        self.table = target.qualified_name
        self.store = WorkerStore(conn, target, "", settings.retry_failed, skip_batched=True)
        self.client = make_client(settings)
        self.provider = make_provider(settings, target.dimensions)  # what a request line says
        self.shape = Shape(multiprocessing.get_context("fork"))  # what runs learned of the endpoint: lines ask so
        self.shape.load(conn, self.provider.endpoint, self.provider.model)
        self.shape.follow(self.provider)
        self.requester: Requester | None = None  # the normal endpoint, opened for the few rows a batch refused
        self.keys = {"column_name": target.embedding_column, "run_id": ""}
        self.identity = guard.column_identity(settings, target)
        self.totals = dict(embedded=0, failed=0, tokens=0, requests=0, retries=0, rate_limited=0, truncated=0)
        self.submitted = 0

    def close(self) -> None:
        self.client.close()
        self.shape.keep(self.settings.database_url, self.provider.endpoint, self.provider.model)
        if self.requester is not None:
            self.requester.embedder.close()
            for name, value in self.requester.shared.totals().items():
                if name in self.totals:
                    self.totals[name] += value

    # --- PostgreSQL ------------------------------------------------------------------------------
    def execute(self, name: str, **params: Any) -> db.Cursor:
        cur = self.conn.cursor()
        slots = {}
        if name == "batch/batch_claim":
            skip = sql.SQL("") if self.settings.retry_failed else self.target.query("claim/skip_failures")
            slots = {"skip_failures": skip, "skip_claimed": self.target.query("claim/skip_claimed")}
        cur.execute(self.target.query(name, **slots), {"table_name": self.table, **params})
        return cur

    def update(self, key: str, **fields: Any) -> None:
        """Set fields of one etl_batches row and commit."""
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in fields
        )
        query = sql.SQL(db.load_sql("batch/update")).format(assignments=assignments)
        with self.conn.cursor() as cur:
            cur.execute(query, {**fields, "key": key})
        self.conn.commit()

    def pending(self) -> list[Record]:
        records = [Record(*row) for row in self.execute("batch/batch_pending").fetchall()]
        self.conn.rollback()
        return records

    def release(self, key: str, row_ids: list[str] | None = None, unplaced_only: bool = False) -> None:
        self.execute("batch/batch_release", key=key, row_ids=row_ids, unplaced_only=unplaced_only).close()

    # --- submit ----------------------------------------------------------------------------------
    def submit_new(self) -> None:
        """Claim the NULL rows not in a pending batch, --batch-rows at a time; record each batch's rows, create it."""
        after, left, exhausted = None, self.settings.limit, False
        limit = self.settings.input_token_limit
        while not exhausted and left != 0:
            want = min(left or self.settings.batch_rows, self.settings.batch_rows)
            row_ids: list[tuple[str, int]] = []  # (row_id, text hash)
            failures: list[Failure] = []
            size = 0
            while not exhausted and size <= TEXT_BYTES_PER_FILE and len(row_ids) + len(failures) < want:
                asked = min(CLAIM_PAGE, want - len(row_ids) - len(failures))
                page = self.execute("batch/batch_claim", after=after, limit=asked, **self.keys).fetchall()
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
                    sql_text = db.load_sql("batch/batch_add_rows")
                    row_ids = psycopg2.extras.execute_values(cur, sql_text, rows, page_size=5000, fetch=True)
                    cur.execute(
                        db.load_sql("batch/batch_record"),
                        {"key": key, "table_name": self.table, "row_count": len(row_ids)},
                    )
                    guard.record_column(cur, self.target, self.identity)  # with the batch that pays for vectors
            self.conn.commit()
            if row_ids:
                self.create(key, 1)

    def create(self, key: str, attempt: int) -> None:
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

    def write_file(self, key: str, file: IO[bytes]) -> int:
        """The JSONL request lines of a batch's rows; their places are committed. Returns the rows placed."""
        limit, size = self.settings.input_token_limit, self.settings.batch_size
        self.shape.follow(self.provider)  # floats, no `dimensions`, as learned (the landing's requests too)
        places: list[tuple[str, str, int, int]] = []  # (table, row_id, request number, position in it)
        chunk: list[Row] = []
        numbers = iter(range(1 << 31))

        def flush() -> None:
            for rows in pack_requests(chunk):
                number = next(numbers)
                places.extend((self.table, row.row_id, number, position) for position, row in enumerate(rows))
                line = self.provider.batch_line(f"{key}:{number}", [row.text for row in rows])
                file.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
            chunk.clear()

        with self.conn.cursor(name="batch_rows") as cur:
            cur.itersize = 2000
            cur.execute(
                self.target.query("batch/batch_rows_text"), {"table_name": self.table, "key": key, "row_ids": None}
            )
            for row_id, _, _, *values in cur:
                text = row_text(values)
                if text:
                    fitted, tokens, cut = fit(text, limit, exact=False)
                    self.totals["truncated"] += cut
                    chunk.append(Row(row_id, fitted, tokens))
                if len(chunk) == size:
                    flush()
        flush()
        self.execute("batch/batch_unplace", key=key).close()
        with self.conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, db.load_sql("batch/batch_place"), places, page_size=5000)
        self.release(key, unplaced_only=True)  # filled, deleted or emptied since they were claimed
        self.conn.commit()
        return len(places)

    def resume(self, create: bool = True) -> None:
        """Records without a batch id: adopt the batch created just before a kill, else create it."""
        records = [record for record in self.pending() if record.batch_id is None]
        if not records:
            return
        found: dict[tuple[str | None, str | None], Batch] = {}
        batch: Batch | None
        oldest = min(record.created for record in records) - 600
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
