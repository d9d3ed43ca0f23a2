"""The catalog: what the table is (Target), whether it can be filled safely, counts, advice."""

import logging
import re
from dataclasses import dataclass

from psycopg2 import sql

from .db import load_sql
from .errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)


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
        raise DatabaseError(f"column {shown}.{settings.embedding_column} is {type_sql}, not a pgvector vector column")
    dimensions = typmod if typmod and typmod > 0 else None
    if dimensions and settings.dimensions and dimensions != settings.dimensions:
        raise ConfigError(
            f"{shown}.{settings.embedding_column} is vector({dimensions}) but EMBEDDING_DIMENSIONS="
            f"{settings.dimensions}; set EMBEDDING_DIMENSIONS={dimensions} or change the column"
        )
    if not scalar(
        conn, load_sql("id_is_unique"), {"relation": relation_literal(conn, parts), "id_column": settings.id_column}
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
    params = {
        "relation": relation_literal(conn, target.name_parts),
        "id_column": target.id_column,
        "embedding_column": target.embedding_column,
    }
    return scalar(conn, load_sql("find_partial_index"), params) is not None


LEDGER_LOCK_KEY = 0x656D6266  # "embf": serialises ledger creation between runs started together


def ensure_ledger(conn):
    """Create the tool's tables when missing: the failure ledger and the runs' leases.

    Two runs started at the same moment would both pass CREATE TABLE IF NOT EXISTS and one
    would fail on the catalog's unique index, so the check and the creation happen under a
    transaction-level advisory lock.
    """
    with conn.cursor() as cur:
        cur.execute(
            "SELECT to_regclass('etl_failures') IS NOT NULL AND to_regclass('etl_runs') IS NOT NULL "
            "AND to_regclass('etl_batch_rows') IS NOT NULL"
        )
        exists = cur.fetchone()[0]
        if not exists:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (LEDGER_LOCK_KEY,))
            cur.execute(load_sql("ledger"))
    conn.commit()


def scalar(conn, query, params=None):
    """The first column of the first row of a read-only query (None without a row)."""
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    conn.rollback()
    return row[0] if row else None


def estimate_rows(conn, target):
    estimate = scalar(conn, load_sql("estimate_rows"), {"relation": relation_literal(conn, target.name_parts)})
    return -1 if estimate is None else estimate


def table_pages(conn, target):
    return scalar(conn, load_sql("table_pages"), {"relation": relation_literal(conn, target.name_parts)}) or 0


def count_null(conn, target):
    return scalar(conn, target.query("count_null"))


def count_known_failures(conn, target):
    if not scalar(conn, "SELECT to_regclass('etl_failures') IS NOT NULL"):
        return 0
    return scalar(conn, target.query("count_known_failures"), {"table_name": target.qualified_name})
