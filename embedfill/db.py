"""Database access: connections, the named SQL files, the table's shape, claims and writes."""

import functools
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from .errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
APPLICATION_PREFIX = "embedfill"

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


@functools.lru_cache(maxsize=None)
def load_sql(name):
    """The text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def describe_url(url):
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the configured database"
    if parts.scheme not in ("postgres", "postgresql"):
        return "the configured database"
    host = parts.hostname or "local socket"
    return f"{host}{':' + str(parts.port) if parts.port else ''}{parts.path or ''}"


def first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


def connect(url, application_name=APPLICATION_PREFIX):
    """A psycopg2 connection, or a one-line DatabaseError naming the server and the cause."""
    try:
        return psycopg2.connect(url, application_name=application_name[:63], connect_timeout=10)
    except psycopg2.Error as error:
        raise DatabaseError(
            f"cannot connect to the database at {describe_url(url)}: {first_line(error)} (check DATABASE_URL)"
        ) from error


def split_table_name(name):
    """'schema.table' or 'table' as a tuple of identifier parts."""
    parts = tuple(part.strip() for part in name.split("."))
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"ETL_TABLE={name!r} is not a table name: use table or schema.table")
    return parts


@dataclass(frozen=True)
class Target:
    """The table being filled, as the catalog describes it (picklable, passed to workers)."""

    name_parts: tuple
    qualified_name: str
    id_column: str
    id_type: str
    text_columns: tuple
    embedding_column: str
    dimensions: int | None

    @property
    def display(self):
        return ".".join(self.name_parts)

    def identifiers(self):
        return {
            "table": sql.Identifier(*self.name_parts),
            "id": sql.Identifier(self.id_column),
            "id_type": sql.SQL(self.id_type),
            "embedding": sql.Identifier(self.embedding_column),
            "text_columns": sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(column)) for column in self.text_columns
            ),
        }

    def query(self, name, **extra):
        """sql/<name>.sql with this table's identifiers filled in (values stay parameters)."""
        return sql.SQL(load_sql(name)).format(**{**self.identifiers(), **extra})


def relation_literal(conn, name_parts):
    return sql.Identifier(*name_parts).as_string(conn)


def inspect_target(conn, settings):
    """Check that the table and its columns exist and that the embedding column is a vector."""
    parts = split_table_name(settings.table)
    with conn.cursor() as cur:
        cur.execute(load_sql("table_columns"), {"relation": relation_literal(conn, parts)})
        rows = cur.fetchall()
    conn.rollback()
    shown = ".".join(parts)
    if not rows:
        raise DatabaseError(f"table {shown} does not exist in {conn.info.dbname} (check ETL_TABLE or --table)")
    columns = {name: (type_sql, typname, typmod) for name, type_sql, typname, typmod, _ in rows}
    qualified = rows[0][4]
    checks = [(settings.id_column, "ETL_ID_COLUMN or --id-column")]
    checks += [(column, "ETL_TEXT_COLUMNS or --text-columns") for column in settings.text_columns]
    for column, where in checks:
        if column not in columns:
            raise DatabaseError(f"column {shown}.{column} does not exist (check {where})")
    if settings.embedding_column not in columns:
        raise DatabaseError(
            f"column {shown}.{settings.embedding_column} does not exist: run `python etl.py init --dimensions N` "
            "to add it, or check ETL_EMBEDDING_COLUMN"
        )
    type_sql, typname, typmod = columns[settings.embedding_column]
    if typname != "vector":
        raise DatabaseError(
            f"column {shown}.{settings.embedding_column} is {type_sql}, not a pgvector vector column"
        )
    dimensions = typmod if typmod and typmod > 0 else None
    if dimensions and settings.dimensions and dimensions != settings.dimensions:
        raise ConfigError(
            f"{shown}.{settings.embedding_column} is vector({dimensions}) but EMBEDDING_DIMENSIONS="
            f"{settings.dimensions}; set EMBEDDING_DIMENSIONS={dimensions} or change the column"
        )
    return Target(
        name_parts=parts,
        qualified_name=qualified,
        id_column=settings.id_column,
        id_type=columns[settings.id_column][0],
        text_columns=tuple(settings.text_columns),
        embedding_column=settings.embedding_column,
        dimensions=dimensions,
    )


def partial_index_sql(target):
    """The statement that creates the recommended partial index (as text, for messages)."""
    index = re.sub(r"\W+", "_", f"{target.name_parts[-1]}_{target.embedding_column}_null_idx")[:63]
    table = ".".join(f'"{p}"' if not re.fullmatch(r"[a-z_][a-z0-9_]*", p) else p for p in target.name_parts)
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({target.id_column}) "
        f"WHERE {target.embedding_column} IS NULL;"
    ), index


def has_partial_index(conn, target):
    with conn.cursor() as cur:
        cur.execute(load_sql("find_partial_index"), {
            "relation": relation_literal(conn, target.name_parts),
            "id_column": target.id_column,
            "embedding_column": target.embedding_column,
        })
        found = cur.fetchone() is not None
    conn.rollback()
    return found


LEDGER_LOCK_KEY = 0x656D6266  # "embf": serialises ledger creation between runs started together


def ensure_ledger(conn):
    """Create the failure ledger when it is missing (the one thing a backfill needs).

    Two runs started at the same moment would both pass CREATE TABLE IF NOT EXISTS and one
    would fail on the catalog's unique index, so the check and the creation happen under a
    transaction-level advisory lock.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('etl_failures') IS NOT NULL")
        exists = cur.fetchone()[0]
        if not exists:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LEDGER_LOCK_KEY,))
            cur.execute(load_sql("ledger"))
    conn.commit()


def estimate_rows(conn, target):
    with conn.cursor() as cur:
        cur.execute(load_sql("estimate_rows"), {"relation": relation_literal(conn, target.name_parts)})
        row = cur.fetchone()
    conn.rollback()
    return row[0] if row else -1


def table_pages(conn, target):
    with conn.cursor() as cur:
        cur.execute(load_sql("table_pages"), {"relation": relation_literal(conn, target.name_parts)})
        pages = cur.fetchone()[0]
    conn.rollback()
    return pages or 0


def count_null(conn, target):
    with conn.cursor() as cur:
        cur.execute(target.query("count_null"))
        count = cur.fetchone()[0]
    conn.rollback()
    return count


def count_known_failures(conn, target):
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('etl_failures') IS NOT NULL")
        if not cur.fetchone()[0]:
            conn.rollback()
            return 0
        cur.execute(target.query("count_known_failures"), {"table_name": target.qualified_name})
        count = cur.fetchone()[0]
    conn.rollback()
    return count


COPY_CHUNK_BYTES = 1 << 20  # the COPY is sent in pieces of about this size, never built whole


class _CopyStream:
    """The binary COPY of (row_id text, embedding vector) rows, read a chunk of rows at a time,
    so that a batch's vectors exist once in memory (the matrix), not two or three times."""

    def __init__(self, row_ids, vectors):
        self.row_ids = row_ids
        self.vectors = vectors
        dims = vectors.shape[1]
        self.field = struct.pack(">ihh", 4 + 4 * dims, dims, 0)
        self.per_chunk = max(1, COPY_CHUNK_BYTES // (4 * dims + 64))
        self.position = 0
        self.state = "header"

    def read(self, size=-1):
        if self.state == "header":
            self.state = "rows"
            return _COPY_HEADER
        if self.position >= len(self.row_ids):
            if self.state == "rows":
                self.state = "done"
                return _COPY_TRAILER
            return b""
        end = min(len(self.row_ids), self.position + self.per_chunk)
        big_endian = self.vectors[self.position:end].astype(">f4")
        parts = []
        for row_id, vector in zip(self.row_ids[self.position:end], big_endian):
            encoded = row_id.encode("utf-8")
            parts.append(struct.pack(">hi", 2, len(encoded)))
            parts.append(encoded)
            parts.append(self.field)
            parts.append(vector.tobytes())
        self.position = end
        return b"".join(parts)


class WorkerStore:
    """One worker's connection and the statements of the hot path."""

    def __init__(self, conn, target, retry_failed):
        self.conn = conn
        self.target = target
        self.retry_failed = retry_failed
        skip = sql.SQL("") if retry_failed else target.query("skip_failures")
        self._claim = target.query("claim_batch", skip_failures=skip).as_string(conn)
        self._write = target.query("write_batch").as_string(conn)
        with conn.cursor() as cur:
            # The staging table has no statistics: keep the planner on the nested loop.
            cur.execute("SET enable_hashjoin = off")
            cur.execute("SET enable_mergejoin = off")
            cur.execute(load_sql("create_stage"))
        conn.commit()

    def claim(self, after, upto, limit):
        """Lock and return up to `limit` rows (id text, *column texts) after `after`, up to `upto`."""
        with self.conn.cursor() as cur:
            cur.execute(self._claim, {
                "after": after, "upto": upto, "limit": limit, "table_name": self.target.qualified_name,
            })
            return cur.fetchall()

    def write(self, row_ids, vectors):
        """Binary-COPY the vectors into the staging table, then move them into their rows."""
        if not row_ids:
            return 0
        with self.conn.cursor() as cur:
            cur.copy_expert("COPY etl_stage (row_id, embedding) FROM STDIN WITH (FORMAT binary)",
                            _CopyStream(row_ids, vectors), size=COPY_CHUNK_BYTES)
            cur.execute(self._write)
            written = cur.rowcount
            if self.retry_failed:
                cur.execute(load_sql("clear_failures"), {
                    "table_name": self.target.qualified_name, "row_ids": list(row_ids),
                })
        return written

    def record_failures(self, failures):
        """Add (row_id, reason, attempts) tuples to the ledger."""
        if not failures:
            return
        values = [(self.target.qualified_name, row_id, reason[:2000], attempts) for row_id, reason, attempts in failures]
        with self.conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, load_sql("record_failures"), values)

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
        try:
            self.conn.rollback()
        except psycopg2.Error:
            pass

    def close(self):
        try:
            self.conn.close()
        except psycopg2.Error:
            pass

