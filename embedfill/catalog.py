"""The catalog: what the table is (Target), whether it can be filled safely, counts, advice."""

import hashlib
import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg2
from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from .db import load_sql
from .errors import ConfigError, DatabaseError
from .models import LOCAL_DEFAULT_DIMENSIONS, model_info

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
    vector_type: str = "vector"  # or halfvec: pgvector's half-precision type

    @property
    def display(self):
        return ".".join(self.name_parts)

    @property
    def column_type(self):
        """The embedding column's type as SQL shows it: vector(1536), halfvec(3072), halfvec."""
        return f"{self.vector_type}({self.dimensions})" if self.dimensions else self.vector_type

    def identifiers(self):
        return {
            "table": sql.Identifier(*self.name_parts),
            "id": sql.Identifier(self.id_column),
            "id_type": sql.SQL(self.id_type),
            "vector_type": sql.SQL(self.vector_type),  # one of two names, never user input
            "embedding": sql.Identifier(self.embedding_column),
            "text_columns": sql.SQL(", ").join(
                sql.SQL("{}::text").format(sql.Identifier(column)) for column in self.text_columns
            ),
        }

    def query(self, name, **extra):
        """sql/<name>.sql with this table's identifiers filled in (values stay parameters)."""
        return sql.SQL(load_sql(name)).format(**{**self.identifiers(), **extra})


def tracking_name(target):
    """(schema, name) of the change-tracking trigger of (table, embedding column): its function
    and its NOTIFY channel share the name. Readable, cut to fit PostgreSQL's 63 bytes, and
    unique thanks to a hash of the qualified table and the column (cutting cannot collide)."""
    relname = target.name_parts[-1]
    schema = target.qualified_name[: -len(relname) - 1]
    digest = hashlib.sha256(f"{target.qualified_name}\0{target.embedding_column}".encode()).hexdigest()[:8]
    base = f"embedfill_track_{relname}_{target.embedding_column}".encode()[:54].decode("utf-8", "ignore")
    return schema, f"{base}_{digest}"


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
    if typname not in ("vector", "halfvec"):
        raise DatabaseError(
            f"column {shown}.{settings.embedding_column} is {type_sql}, not a pgvector vector or halfvec column"
        )
    dimensions = typmod if typmod and typmod > 0 else None
    if dimensions and settings.dimensions and dimensions != settings.dimensions:
        raise ConfigError(
            f"{shown}.{settings.embedding_column} is {type_sql} but EMBEDDING_DIMENSIONS="
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
        vector_type=typname,
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


LEDGER_TABLES = [
    "etl_failures",
    "etl_runs",
    "etl_columns",
    "etl_deferred_indexes",
    "etl_batches",
    "etl_batch_rows",
]  # sql/ledger.sql creates them all
LEDGER_LOCK_KEY = 0x656D6266  # "embf": serialises ledger creation between runs started together
RESET_LOCK_KEY = 0x656D6272  # "embr", with the table's hash: held by init --reset-column while it clears


def ensure_ledger(conn):
    """Create the tool's tables when missing: the failure ledger and the runs' leases.

    Two runs started at the same moment would both pass CREATE TABLE IF NOT EXISTS and one
    would fail on the catalog's unique index, so the check and the creation happen under a
    transaction-level advisory lock.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT bool_and(to_regclass(name) IS NOT NULL) FROM unnest(%s::text[]) name", (LEDGER_TABLES,))
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


# --- what the column holds: the model guard ----------------------------------------------------


def column_identity(settings, target):
    """What this run writes into the column: model, dimensions, provider (the base URL's host,
    never the key) and recipe (the text columns, in order)."""
    if settings.provider == "local":
        provider, default = "local", LOCAL_DEFAULT_DIMENSIONS
    else:
        if settings.provider == "azure":
            provider = urlsplit(settings.azure_endpoint).hostname
        else:
            provider = urlsplit(settings.base_url or "").hostname or "api.openai.com"
        default = getattr(model_info(settings.model), "dimensions", None)
    return {
        "model": settings.model_name,
        "dimensions": settings.dimensions or target.dimensions or default,
        "provider": provider,
        "recipe": list(target.text_columns),
    }


def column_record(conn, target):
    """What etl_columns says the column holds (column_identity's keys, origin_unknown, recorded), or None."""
    if not scalar(conn, "SELECT to_regclass('etl_columns') IS NOT NULL"):
        return None
    with conn.cursor(cursor_factory=RealDictCursor) as cur:
        cur.execute(load_sql("column_record"), _column_key(target))
        row = cur.fetchone()
    conn.rollback()
    return dict(row) if row else None


def _has_vectors(conn, target):
    """Whether the column already holds vectors: statistics that saw one say yes at once; else a
    search of at most 5 s (a big table still all NULL is not read to its end: then, no)."""
    params = {"relation": relation_literal(conn, target.name_parts), "column": target.embedding_column}
    if scalar(conn, load_sql("stats_say_vectors"), params):
        return True
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = '5s'")
            cur.execute(target.query("has_vectors"))
            return cur.fetchone()[0]
    except psycopg2.errors.QueryCanceled:
        log.info("%s.%s: no vector found within 5 s; taken as empty", target.display, target.embedding_column)
        return False
    finally:
        conn.rollback()


def guard_column(conn, settings, target, record=True):
    """Refuse, before any request, a run that would add vectors of another model, dimension
    count, provider or recipe to the column; with `record`, the first run records its own.

    Vectors of two models in one column are not comparable: search would be quietly wrong."""
    wanted = column_identity(settings, target)
    reset = "SELECT pg_try_advisory_xact_lock_shared(%s, hashtext(%s))"
    if record and not scalar(conn, reset, (RESET_LOCK_KEY, target.qualified_name)):
        raise ConfigError(
            f"init --reset-column is clearing {target.display}.{target.embedding_column} now: run again once it ends"
        )
    held = column_record(conn, target)
    if held is None and record:
        adopted = _has_vectors(conn, target)
        with conn.cursor() as cur:
            cur.execute(load_sql("record_column"), {**_column_key(target), **wanted, "origin_unknown": adopted})
            won = cur.fetchone() is not None
        conn.commit()
        if won and adopted:
            log.warning(
                "%s.%s already held vectors when this tool first saw it: recorded as %s, but their origin is "
                "unknown (`python etl.py verify` checks them)",
                target.display,
                target.embedding_column,
                describe_identity(wanted),
            )
        held = column_record(conn, target)  # two runs starting together: the first row in is the record
    differing = [key for key in wanted if held is not None and held[key] != wanted[key]]
    if differing:
        raise ConfigError(
            f"{target.display}.{target.embedding_column} holds {describe_identity(held, differing)}; this run would "
            f"add {describe_identity(wanted, differing, 'ones')}. Fill a new column (--embedding-column embedding_v2, "
            "created by init --dimensions N) or clear this one first (init --reset-column --yes)"
        )


def describe_identity(identity, keys=("dimensions", "provider", "recipe"), noun="vectors"):
    """'text-embedding-3-small vectors of 1536 dimensions from api.openai.com (text: name,category)'."""
    parts = [identity["model"], noun]
    if "dimensions" in keys:
        parts.append(f"of {identity['dimensions'] or 'the default number of'} dimensions")
    if "provider" in keys:
        parts.append(f"from {identity['provider']}")
    if "recipe" in keys:
        parts.append(f"(text: {','.join(identity['recipe'])})")
    return " ".join(parts)


def describe_column(conn, target):
    """One line for `status`: what the column holds, by the record of its first write."""
    held = column_record(conn, target)
    name = f"{target.display}.{target.embedding_column}"
    if held is None:
        return f"column {name}: no record yet (the next run records its model, provider and text columns)"
    unknown = "; vectors already there then: origin unknown" if held["origin_unknown"] else ""
    return f"column {name} holds {describe_identity(held)} (recorded {held['recorded']}{unknown})"


def _column_key(target):
    return {"table_name": target.qualified_name, "column_name": target.embedding_column}


def has_rows_to_embed(conn, target, retry_failed):
    """Is there a row to embed? One row through the partial index, never a count."""
    skip = sql.SQL("") if retry_failed else target.query("skip_failures")
    return (
        scalar(conn, target.query("probe_null", skip_failures=skip), {"table_name": target.qualified_name}) is not None
    )
