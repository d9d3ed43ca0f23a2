"""The verbs around the backfill: `init` (schema), `status` (where a run stands), `search`."""

import logging

import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2 import sql

from . import catalog, db
from .embedders import make_embedder
from .errors import EXIT_OK, DatabaseError
from .texts import row_text

log = logging.getLogger(__name__)


def init_schema(settings, out):
    """Apply sql/ idempotently: the extension, the ledger, the column (with --dimensions), the index."""
    conn = db.connect(settings.database_url)
    conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(db.load_sql("extension"))
            cur.execute(db.load_sql("ledger"))
        print("extension vector: ready", file=out)
        print("ledger etl_failures: ready", file=out)
        parts = catalog.split_table_name(settings.table)
        with conn.cursor() as cur:
            cur.execute(db.load_sql("table_columns"), {"relation": catalog.relation_literal(conn, parts)})
            columns = {row[0] for row in cur.fetchall()}
        if not columns:
            raise DatabaseError(f"table {'.'.join(parts)} does not exist (check ETL_TABLE or --table)")
        if settings.embedding_column not in columns:
            if not settings.dimensions:
                raise DatabaseError(
                    f"column {'.'.join(parts)}.{settings.embedding_column} does not exist: "
                    "pass --dimensions N (or set EMBEDDING_DIMENSIONS) to add it as vector(N)"
                )
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL(db.load_sql("add_embedding_column")).format(
                        table=sql.Identifier(*parts),
                        embedding=sql.Identifier(settings.embedding_column),
                        dimensions=sql.Literal(settings.dimensions),
                    )
                )
            print(f"column {settings.embedding_column}: added as vector({settings.dimensions})", file=out)
        target = catalog.inspect_target(conn, settings)
        _, index = catalog.partial_index_sql(target)
        if catalog.has_partial_index(conn, target):
            print("partial index: present", file=out)
        else:
            with conn.cursor() as cur:
                cur.execute(target.query("partial_index", index=sql.Identifier(index)))
            print(f"partial index {index}: created", file=out)
    except psycopg2.Error as error:
        raise DatabaseError(f"init failed: {db.first_line(error)}") from error
    finally:
        conn.close()
    return EXIT_OK


def show_status(settings, out, top=5):
    """Rows total (estimate), rows still NULL, failures and their reasons, active runs."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        estimate = catalog.estimate_rows(conn, target)
        null_rows = catalog.count_null(conn, target)
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('etl_failures') IS NOT NULL, to_regclass('etl_runs') IS NOT NULL")
            has_ledger, has_runs = cur.fetchone()
            reasons, failed, leases = [], 0, []
            if has_ledger:
                cur.execute(db.load_sql("ledger_count"), {"table_name": target.qualified_name})
                failed = cur.fetchone()[0]
                cur.execute(db.load_sql("status_failures"), {"table_name": target.qualified_name, "top": top})
                reasons = cur.fetchall()
            if has_runs:
                cur.execute(db.load_sql("status_runs"), {"table_name": target.qualified_name})
                leases = cur.fetchall()
            pattern = f"{db.APPLICATION_PREFIX}:{target.qualified_name}:%"
            cur.execute(db.load_sql("status_active"), {"pattern": pattern[:63]})
            runs, processes = cur.fetchone()
        conn.rollback()
        from .batchapi import status_lines  # imported here: batchapi pulls in the driver, which status needs not

        batches = status_lines(conn, target)
    finally:
        conn.close()
    total = f"~{estimate}" if estimate >= 0 else "unknown"
    print(
        f"status table={target.display} rows_total_estimate={total} rows_null={null_rows} "
        f"rows_failed={failed} active_runs={runs} active_processes={processes} run_active={'yes' if runs else 'no'}",
        file=out,
    )
    for run_id, tpm, rpm, runs, age in leases:
        budgets = " ".join(f"{name}={value / runs:.0f}" for name, value in (("tpm", tpm), ("rpm", rpm)) if value)
        print(f"run {run_id} share=1/{runs} {budgets or 'no configured budget'} running_for={age}".rstrip(), file=out)
    for reason, count in reasons:
        print(f"failed {count:>8}  {reason}", file=out)
    for line in batches:
        print(line, file=out)
    return EXIT_OK


def search(settings, query, top, out):
    """Embed `query` with the configured provider and print the nearest rows."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        embedder = make_embedder(settings, target.dimensions)
        try:
            vector = embedder.embed([query]).vectors[0]
        finally:
            embedder.close()
        if target.dimensions and vector.shape[0] != target.dimensions:
            raise DatabaseError(
                f"{target.display}.{target.embedding_column} is vector({target.dimensions}) but the query "
                f"embedding has {vector.shape[0]} dimensions; use the provider and model the table was filled with"
            )
        register_vector(conn)
        with conn.cursor() as cur:
            cur.execute(target.query("nearest"), {"query": vector, "top": top})
            rows = cur.fetchall()
        conn.rollback()
    finally:
        conn.close()
    if not rows:
        print(f"no embedded rows in {target.display} yet: run `python etl.py` first", file=out)
    for row_id, *values, distance in rows:
        text = row_text(values).replace("\n", " | ")
        print(f"{distance:.4f}  {row_id}  {text[:120]}", file=out)
    return EXIT_OK
