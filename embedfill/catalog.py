"""The catalog: what the table is (Target), whether it can be filled safely, counts, advice."""

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from psycopg2 import sql

from . import db
from .columns import TYPES, ColumnType, width_error
from .db import load_sql
from .errors import ConfigError, DatabaseError, UsageError

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)


VECTOR_TYPES = tuple(TYPES)


def split_table_name(name: str) -> tuple[str, ...]:
    """'schema.table' or 'table' as a tuple of identifier parts."""
    parts = tuple(part.strip() for part in name.split("."))
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"ETL_TABLE={name!r} is not a table name: use table or schema.table")
    return parts


@dataclass(frozen=True)
class Target:
    """The table being filled, as the catalog describes it (picklable, passed to workers)."""

    name_parts: tuple[str, ...]
    qualified_name: str
    id_column: str
    id_type: str
    text_columns: tuple[str, ...]
    embedding_column: str
    dimensions: int | None
    vector_type: str = "vector"  # or halfvec: pgvector's half-precision type
    partitioned: bool = False

    @property
    def display(self) -> str:
        return ".".join(self.name_parts)

    @property
    def kind(self) -> ColumnType:
        """The column's type (columns/): its binary format, the values it holds."""
        return TYPES[self.vector_type]

    @property
    def column_type(self) -> str:
        """The embedding column's type as SQL shows it: vector(1536), halfvec(3072), halfvec."""
        return self.kind.sql(self.dimensions)

    def width_error(self, settings: "Settings", width: int, refused: bool = False) -> str | None:
        """The one-line message when `width`-dimensional embeddings do not fit this column (or
        EMBEDDING_DIMENSIONS), else None: the one dimension check, for every path that writes.
        `refused`: the server does not accept `dimensions`."""
        shown = f"{self.display}.{self.embedding_column}"
        typed, configured = self.dimensions, settings.dimensions
        return width_error(shown, self.column_type, typed, configured, settings.model_name, width, refused)

    def identifiers(self) -> dict[str, sql.Composable]:
        texts = [sql.Identifier(column) for column in self.text_columns]
        qualified = sql.SQL(", ").join(sql.SQL("t.{}::text").format(text) for text in texts)
        return {
            "table": sql.Identifier(*self.name_parts),
            "id": sql.Identifier(self.id_column),
            "id_type": sql.SQL(self.id_type),
            "vector_type": sql.SQL(self.vector_type),  # one of two names, never user input
            "embedding": sql.Identifier(self.embedding_column),
            "text_columns": sql.SQL(", ").join(sql.SQL("{}::text").format(text) for text in texts),
            # The hash of a row's text columns (the table aliased t): taken at claim time, checked at
            # the write. A ROW's text form quotes its fields, so ('a b', NULL) and ('a', 'b') differ.
            # hashtextextended (PostgreSQL's own 64-bit hash, as hash partitioning uses): twice as
            # fast as sha256 over a row, and outside OpenSSL, so FIPS mode does not refuse it (md5);
            # an edit it misses is one in 2^64.
            "row_hash": sql.SQL("hashtextextended(ROW({})::text, 0)").format(qualified),
            # Positional names inside the claim, whatever the user's columns are called.
            "claim_texts": sql.SQL(", ").join(
                sql.SQL("t.{}::text AS {}").format(text, sql.Identifier(f"etl_text_{n}"))
                for n, text in enumerate(texts)
            ),
            "claimed_texts": sql.SQL(", ").join(sql.Identifier("k", f"etl_text_{n}") for n in range(len(texts))),
        }

    def query(self, name: str, **extra: sql.Composable) -> sql.Composed:
        """sql/<name>.sql with this table's identifiers filled in (values stay parameters)."""
        return sql.SQL(load_sql(name)).format(**{**self.identifiers(), **extra})


def tracking_name(target: Target) -> tuple[str, str]:
    """(schema, name) of the change-tracking trigger of (table, embedding column): its function
    and its NOTIFY channel share the name. Readable, cut to fit PostgreSQL's 63 bytes, and
    unique thanks to a hash of the qualified table and the column (cutting cannot collide)."""
    relname = target.name_parts[-1]
    schema = target.qualified_name[: -len(relname) - 1]
    digest = hashlib.sha256(f"{target.qualified_name}\0{target.embedding_column}".encode()).hexdigest()[:8]
    base = f"embedfill_track_{relname}_{target.embedding_column}".encode()[:54].decode("utf-8", "ignore")
    return schema, f"{base}_{digest}"


def relation_literal(conn: db.Connection, name_parts: tuple[str, ...]) -> str:
    return sql.Identifier(*name_parts).as_string(conn)


def inspect_target(conn: db.Connection, settings: "Settings") -> Target:
    """Check that the table and its columns exist and that the embedding column is a vector."""
    parts = split_table_name(cast(str, settings.table))
    with conn.cursor() as cur:
        cur.execute(load_sql("table/table_columns"), {"relation": relation_literal(conn, parts)})
        rows = cur.fetchall()
    conn.rollback()
    shown = ".".join(parts)
    if not rows:
        raise DatabaseError(f"table {shown} does not exist in {conn.info.dbname} (check ETL_TABLE or --table)")
    columns = {name: (type_sql, typname, typmod) for name, type_sql, typname, typmod, *_ in rows}
    qualified, partitioned = rows[0][4], rows[0][5]
    text_columns = settings.text_columns or ()  # none only for `init`, which needs none (--track-changes aside)
    checks = [(settings.id_column, "ETL_ID_COLUMN or --id-column")]
    checks += [(column, "ETL_TEXT_COLUMNS or --text-columns") for column in text_columns]
    for column, where in checks:
        if column not in columns:
            raise DatabaseError(f"column {shown}.{column} does not exist (check {where})")
    embedding = settings.embedding_column
    vectors = [name for name, (_, typname, _) in columns.items() if typname in VECTOR_TYPES]
    if embedding not in columns or columns[embedding][1] not in VECTOR_TYPES:
        if not scalar(conn, load_sql("table/has_pgvector")):
            raise DatabaseError(
                f"the pgvector extension is not installed in {conn.info.dbname}, so {shown}.{embedding} cannot hold "
                "vectors: run `python etl.py init` (CREATE EXTENSION vector), or ask the database's administrator"
            )
    if embedding not in columns and vectors:
        raise DatabaseError(
            f"column {shown}.{embedding} does not exist; {shown} has the vector column {', '.join(vectors)} "
            f"(set ETL_EMBEDDING_COLUMN={vectors[0]}), or add {embedding} with `python etl.py init --dimensions N`"
        )
    if embedding not in columns:
        raise DatabaseError(
            f"column {shown}.{embedding} does not exist: run `python etl.py init --dimensions N` "
            "to add it, or check ETL_EMBEDDING_COLUMN"
        )
    type_sql, typname, typmod = columns[embedding]
    if typname not in VECTOR_TYPES:
        raise DatabaseError(f"column {shown}.{embedding} is {type_sql}, not a pgvector vector or halfvec column")
    dimensions = typmod if typmod and typmod > 0 else None
    if dimensions and settings.dimensions and dimensions != settings.dimensions:
        raise ConfigError(
            f"{shown}.{settings.embedding_column} is {type_sql} but EMBEDDING_DIMENSIONS="
            f"{settings.dimensions}; set EMBEDDING_DIMENSIONS={dimensions} or change the column"
        )
    if not scalar(
        conn,
        load_sql("table/id_is_unique"),
        {"relation": relation_literal(conn, parts), "id_column": settings.id_column},
    ):
        raise DatabaseError(
            f"column {shown}.{settings.id_column} is not known to be unique: it needs a primary key or a unique index "
            f"on it alone, or one row's vector could land in every row sharing its id (add one, or set ETL_ID_COLUMN)"
        )
    return Target(
        name_parts=parts,
        qualified_name=qualified,
        id_column=settings.id_column,
        id_type=columns[settings.id_column][0],
        text_columns=tuple(text_columns),
        embedding_column=settings.embedding_column,
        dimensions=dimensions,
        vector_type=typname,
        partitioned=partitioned,
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def partial_index_sql(target: Target) -> tuple[str, str]:
    """(the statement that creates the recommended partial index, as text for messages, its name).
    Every identifier is quoted, so that it works as printed; a partitioned table cannot have an
    index built CONCURRENTLY in one statement, so it is advised without."""
    index = re.sub(r"\W+", "_", f"{target.name_parts[-1]}_{target.embedding_column}_null_idx")[:63]
    table = ".".join(_quoted(part) for part in target.name_parts)
    how = "" if target.partitioned else "CONCURRENTLY "
    return (
        f"CREATE INDEX {how}IF NOT EXISTS {_quoted(index)} ON {table} ({_quoted(target.id_column)}) "
        f"WHERE {_quoted(target.embedding_column)} IS NULL;"
    ), index


def has_partial_index(conn: db.Connection, target: Target) -> bool:
    params = {
        "relation": relation_literal(conn, target.name_parts),
        "id_column": target.id_column,
        "embedding_column": target.embedding_column,
    }
    return scalar(conn, load_sql("table/find_partial_index"), params) is not None


def tool_table_exists(conn: db.Connection, name: str) -> bool:
    """Whether one of the tool's tables exists yet (a read-only verb may look at a database no run has used)."""
    return bool(scalar(conn, load_sql("status/table_exists"), {"name": name}))


def scalar(conn: db.Connection, query: str | sql.Composable, params: dict[str, Any] | None = None) -> Any:
    """The first column of the first row of a read-only query (None without a row)."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    conn.rollback()
    return row[0] if row else None


def estimate_rows(conn: db.Connection, target: Target) -> int:
    estimate = scalar(conn, load_sql("status/estimate_rows"), {"relation": relation_literal(conn, target.name_parts)})
    return -1 if estimate is None else estimate


def table_pages(conn: db.Connection, target: Target) -> int:
    return scalar(conn, load_sql("status/table_pages"), {"relation": relation_literal(conn, target.name_parts)}) or 0


def count_null(conn: db.Connection, target: Target) -> int:
    return scalar(conn, target.query("status/count_null"))


def count_known_failures(conn: db.Connection, target: Target) -> int:
    if not tool_table_exists(conn, "etl_failures"):
        return 0
    return scalar(conn, target.query("status/count_known_failures"), {"table_name": target.qualified_name})


def _left_query(
    name: str, target: Target, retry_failed: bool, run_id: str | None
) -> tuple[sql.Composed, dict[str, Any]]:
    skip = sql.SQL("") if retry_failed else target.query("claim/skip_failures")
    params = {"table_name": target.qualified_name, "column_name": target.embedding_column, "run_id": run_id or ""}
    return target.query(name, skip_failures=skip, skip_claimed=target.query("claim/skip_claimed")), params


def has_rows_to_embed(conn: db.Connection, target: Target, retry_failed: bool, run_id: str | None = None) -> bool:
    """Is there a row to embed that no other run is on? One row through the partial index, never a count."""
    return scalar(conn, *_left_query("claim/probe_null", target, retry_failed, run_id)) is not None


def count_left(conn: db.Connection, target: Target, run_id: str | None, retry_failed: bool) -> int:
    """Rows still NULL that no run is on: not failed, not claimed by another live run, not batched."""
    return scalar(conn, *_left_query("claim/count_left", target, retry_failed, run_id))


def check_connections(conn: db.Connection, workers: int, needed: int) -> None:
    """Refuse before anything starts a run that needs more connections than the server has free."""
    free, most, used, role_free, database_free = _row(conn, load_sql("status/free_connections"))
    limits = [value for value in (free, role_free, database_free) if value is not None]
    if limits and needed > min(limits):
        which = "the role's connection limit" if role_free == min(limits) and role_free != free else "the server"
        raise UsageError(
            f"--workers {workers} needs {needed} database connections, but {which} leaves {max(0, min(limits))} "
            f"free (max_connections {most}, {used} in use): lower --workers"
        )


def _row(conn: db.Connection, query: str | sql.Composable, params: dict[str, Any] | None = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    conn.rollback()
    return row
