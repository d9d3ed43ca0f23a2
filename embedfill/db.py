"""Database access on the hot path: connections, the named SQL files, claims and writes.

Catalog inspection, counts and advice live in catalog.py."""

import contextlib
import functools
import logging
import struct
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from .errors import DatabaseError

log = logging.getLogger(__name__)

# sql/ at the top of a checkout; inside the package (embedfill/sql) when installed from a build,
# which ships the same files there (pyproject.toml).
_PACKAGE = Path(__file__).resolve().parent
SQL_DIR = next((d for d in (_PACKAGE / "sql", _PACKAGE.parent / "sql") if d.is_dir()), _PACKAGE.parent / "sql")
APPLICATION_PREFIX = "embedfill"
COPY_CHUNK_BYTES = 1 << 20  # the COPY is sent in pieces of about this size, never built whole
# Serialization failure, deadlock, lock timeout, statement timeout: roll back and try again.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})

SKIPPED = "a trigger, rule or row-level security policy on the table skipped it"
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


@functools.cache
def load_sql(name):
    """The text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def describe_url(url):
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.scheme in ("postgres", "postgresql"):
            return f"{parts.hostname or 'local socket'}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    except ValueError:  # a port out of range
        pass
    return "the configured database"


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


def connect(url, application_name=APPLICATION_PREFIX):
    """A psycopg2 connection speaking UTF-8 whatever the database's encoding (ids and texts
    round-trip exactly), or a one-line DatabaseError naming the server and the cause."""
    try:
        return psycopg2.connect(url, application_name=application_name[:63], connect_timeout=10, client_encoding="UTF8")
    except psycopg2.Error as error:
        raise DatabaseError(
            f"cannot connect to the database at {describe_url(url)}: {first_line(error)} (check DATABASE_URL)"
        ) from error


class ChunkReader:
    """A file for COPY to read, over an iterator of byte chunks: nothing is built whole."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)

    def read(self, size=-1):
        return next(self.chunks, b"")


def copy_chunks(row_ids, vectors, half=False):
    """The binary COPY of (row_id text, embedding vector or halfvec) rows, about COPY_CHUNK_BYTES
    at a time, so that a batch's vectors exist once in memory (the matrix), not two or three times.
    Both types are sent as (int16 dimensions, int16 unused, values): float32 or float16, big-endian."""
    yield _COPY_HEADER
    dims = vectors.shape[1]
    dtype, size = (">f2", 2) if half else (">f4", 4)
    field = struct.pack(">ihh", 4 + size * dims, dims, 0)
    per_chunk = max(1, COPY_CHUNK_BYTES // (size * dims + 64))
    for start in range(0, len(row_ids), per_chunk):
        parts, end = [], start + per_chunk
        for row_id, vector in zip(row_ids[start:end], vectors[start:end].astype(dtype)):
            encoded = row_id.encode("utf-8")
            parts += (struct.pack(">hi", 2, len(encoded)), encoded, field, vector.tobytes())
        yield b"".join(parts)
    yield _COPY_TRAILER


class WorkerStore:
    """One worker's connection and the statements of the hot path."""

    def __init__(self, conn, target, retry_failed, skip_batched=None):
        self.conn = conn
        self.target = target
        self.retry_failed = retry_failed
        skip = sql.SQL("") if retry_failed else target.query("skip_failures")
        if skip_batched is None:  # rows of pending --batch-api batches: checked once per connection
            skip_batched = self._has_pending_batches()
        batched = target.query("skip_batched") if skip_batched else sql.SQL("")
        self._claim = target.query("claim_batch", skip_failures=skip, skip_batched=batched).as_string(conn)
        self._write = target.query("write_batch").as_string(conn)
        with conn.cursor() as cur:
            # The staging table has no statistics: keep the planner on the nested loop.
            cur.execute("SET enable_hashjoin = off")
            cur.execute("SET enable_mergejoin = off")
            cur.execute(target.query("create_stage"))
        conn.commit()

    def _has_pending_batches(self):
        with self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass('etl_batch_rows') IS NOT NULL")
            if cur.fetchone()[0]:
                cur.execute(
                    "SELECT EXISTS (SELECT 1 FROM etl_batch_rows WHERE table_name = %s)", (self.target.qualified_name,)
                )
                return cur.fetchone()[0]
        return False

    def claim(self, after, upto, limit):
        """Lock and return up to `limit` rows (id text, *column texts) after `after`, up to `upto`."""
        with self.conn.cursor() as cur:
            cur.execute(
                self._claim, {"after": after, "upto": upto, "limit": limit, "table_name": self.target.qualified_name}
            )
            return cur.fetchall()

    def write(self, row_ids, vectors):
        """Binary-COPY the vectors into the staging table, then move them into their rows.

        Returns (rows written, [(row_id, reason, attempts)] of rows the write left NULL)."""
        with self.conn.cursor() as cur:
            cur.copy_expert(
                "COPY etl_stage (row_id, embedding) FROM STDIN WITH (FORMAT binary)",
                ChunkReader(copy_chunks(row_ids, vectors, self.target.vector_type == "halfvec")),
                size=COPY_CHUNK_BYTES,
            )
            cur.execute(self._write)
            written = cur.rowcount
            left = [] if written == len(row_ids) else self._unwritten(cur)
            if self.retry_failed:
                cur.execute(
                    load_sql("clear_failures"), {"table_name": self.target.qualified_name, "row_ids": list(row_ids)}
                )
        return written, left

    def _unwritten(self, cur):
        """Why the write matched fewer rows than were staged: a row deleted or filled by someone
        else meanwhile is fine; a row left NULL is recorded (or every rerun would pay for it
        again); an id that does not come back from its text form stops the run."""
        cur.execute(self.target.query("unwritten_rows"))
        left = []
        for row_id, state in cur.fetchall():
            if state == "unmatched":
                raise DatabaseError(
                    f"{self.target.display}.{self.target.id_column} value {row_id!r} does not come back from its text "
                    f"form, so its vector cannot be written; use an id column of integer, bigint, uuid or text"
                )
            if state == "null":
                left.append((row_id, f"the write left the row NULL: {SKIPPED}", 1))
            else:
                log.info("row %s was %s while it was being embedded; its vector was not written", row_id, state)
        return left

    def record_failures(self, failures):
        """Add (row_id, reason, attempts) tuples to the ledger."""
        if failures:
            table = self.target.qualified_name
            with self.conn.cursor() as cur:
                psycopg2.extras.execute_values(
                    cur, load_sql("record_failures"), [(table, id_, why[:2000], n) for id_, why, n in failures]
                )

    def commit(self):
        self.conn.commit()

    def alive(self):
        """Roll back after an error; False when the connection itself is gone."""
        if self.conn.closed:
            return False
        try:
            self.conn.rollback()
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            self.conn.rollback()
            return True
        except psycopg2.Error:
            return False

    def rollback(self):
        with contextlib.suppress(psycopg2.Error):
            self.conn.rollback()

    def close(self):
        with contextlib.suppress(psycopg2.Error):
            self.conn.close()
