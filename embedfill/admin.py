"""The verbs around the backfill: `init` (schema), `status` (where a run stands), `search`."""

import logging

import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2 import sql

from . import catalog, db, indexes, schema
from .embedders import make_embedder
from .errors import EXIT_OK, ConfigError, DatabaseError
from .texts import row_text

log = logging.getLogger(__name__)


def init_schema(settings, out, vector_type="vector", restore_index=False, tracking=None):
    """Apply sql/ idempotently: the extension, the ledger, the column (with --dimensions), the index;
    with tracking="track" the change-tracking trigger too, with "untrack" only its removal."""
    if tracking == "untrack":
        return untrack(settings, out)
    conn = db.connect(settings.database_url)
    conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(db.load_sql("extension"))
        conn.autocommit = False
        schema.ensure(conn)
        conn.commit()
        conn.autocommit = True
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
                    f"pass --dimensions N (or set EMBEDDING_DIMENSIONS) to add it as {vector_type}(N)"
                )
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL(db.load_sql("add_embedding_column")).format(
                        table=sql.Identifier(*parts),
                        embedding=sql.Identifier(settings.embedding_column),
                        dimensions=sql.Literal(settings.dimensions),
                        vector_type=sql.SQL(vector_type),
                    )
                )
            print(f"column {settings.embedding_column}: added as {vector_type}({settings.dimensions})", file=out)
        target = catalog.inspect_target(conn, settings)
        _, index = catalog.partial_index_sql(target)
        if catalog.has_partial_index(conn, target):
            print("partial index: present", file=out)
        else:
            with conn.cursor() as cur:
                how = sql.SQL("" if target.partitioned else "CONCURRENTLY")
                cur.execute(target.query("partial_index", index=sql.Identifier(index), concurrently=how))
            print(f"partial index {index}: created", file=out)
        if tracking == "track":
            with conn.cursor() as cur:
                cur.execute(_tracking_query("track_changes", target))
            print(
                f"change tracking: on (trigger {catalog.tracking_name(target)[1]} nulls the vector of a row whose "
                "text changes and wakes `--follow` runs)",
                file=out,
            )
    except psycopg2.Error as error:
        raise DatabaseError(f"init failed: {db.first_line(error)}") from error
    finally:
        conn.close()
    if restore_index:
        rebuilt = indexes.restore(settings, target)
        print(
            f"vector indexes rebuilt: {', '.join(rebuilt) or 'none waiting (or a run on the table is alive)'}", file=out
        )
    return EXIT_OK


def untrack(settings, out):
    """Remove the change-tracking trigger and its function (`init --untrack`)."""
    conn = db.connect(settings.database_url)
    conn.autocommit = True
    try:
        target = catalog.inspect_target(conn, settings)
        with conn.cursor() as cur:
            cur.execute(_tracking_query("untrack_changes", target))
    except psycopg2.Error as error:
        raise DatabaseError(f"init --untrack failed: {db.first_line(error)}") from error
    finally:
        conn.close()
    print(f"change tracking: off (trigger {catalog.tracking_name(target)[1]} removed)", file=out)
    return EXIT_OK


def _tracking_query(name, target):
    schema, trigger = catalog.tracking_name(target)
    texts = [sql.Identifier(column) for column in target.text_columns]
    return target.query(
        name,
        function=sql.Identifier(schema, trigger),
        trigger=sql.Identifier(trigger),
        channel=sql.Literal(trigger),
        columns=sql.SQL(", ").join(texts),
        new_texts=sql.SQL(", ").join(sql.SQL("NEW.{}").format(t) for t in texts),
        old_texts=sql.SQL(", ").join(sql.SQL("OLD.{}").format(t) for t in texts),
    )


def show_status(settings, out, top=5):
    """Rows total (estimate), rows still NULL, failures and their reasons, active runs."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        estimate = catalog.estimate_rows(conn, target)
        null_rows = catalog.count_null(conn, target)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT to_regclass('etl_failures') IS NOT NULL, to_regclass('etl_runs') IS NOT NULL, "
                "to_regclass('etl_deferred_indexes') IS NOT NULL"
            )
            has_ledger, has_runs, has_deferred = cur.fetchone()
            reasons, failed, leases = [], 0, []
            if has_ledger:
                cur.execute(db.load_sql("ledger_count"), {"table_name": target.qualified_name})
                failed = cur.fetchone()[0]
                cur.execute(db.load_sql("status_failures"), {"table_name": target.qualified_name, "top": top})
                reasons = cur.fetchall()
            if has_runs:
                cur.execute(db.load_sql("status_runs"), {"table_name": target.qualified_name})
                leases = cur.fetchall()
            waiting = indexes.deferred(conn, target) if has_deferred else []
            pattern = f"{db.APPLICATION_PREFIX}:{target.qualified_name}:%"
            cur.execute(db.load_sql("status_active"), {"pattern": pattern[:63]})
            runs, processes = cur.fetchone()
            relation = catalog.relation_literal(conn, target.name_parts)
            cur.execute(
                db.load_sql("tracking_status"), {"relation": relation, "trigger": catalog.tracking_name(target)[1]}
            )
            tracking = "on" if cur.fetchone()[0] else "off"
            if settings.updated_column:
                try:
                    cur.execute(target.query("oldest_null", updated=sql.Identifier(settings.updated_column)))
                except psycopg2.Error as error:
                    raise DatabaseError(
                        f"cannot read {target.display}.{settings.updated_column}: {db.first_line(error)} "
                        "(check ETL_UPDATED_COLUMN)"
                    ) from error
                tracking += f" oldest_null_age={(cur.fetchone()[0] or 'none').replace(' ', '_')}"
        conn.rollback()
        holds = catalog.describe_column(conn, target)
        from .batchapi import status_lines  # imported here: batchapi pulls in the driver, which status needs not

        batches = status_lines(conn, target)
    finally:
        conn.close()
    total = f"~{estimate}" if estimate >= 0 else "unknown"
    print(
        f"status table={target.display} rows_total_estimate={total} rows_null={null_rows} "
        f"rows_failed={failed} active_runs={runs} active_processes={processes} run_active={'yes' if runs else 'no'} "
        f"tracking={tracking}",
        file=out,
    )
    print(holds, file=out)
    for run_id, tpm, rpm, runs, age in leases:
        budgets = " ".join(f"{name}={value / runs:.0f}" for name, value in (("tpm", tpm), ("rpm", rpm)) if value)
        print(f"run {run_id} share=1/{runs} {budgets or 'no configured budget'} running_for={age}".rstrip(), file=out)
    for _, name, _, age in waiting:
        print(
            f"index {name} dropped by --defer-index {age} ago, waiting to be rebuilt at the end of a run "
            "(or now: python etl.py init --restore-index)",
            file=out,
        )
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
        held, wanted = catalog.column_record(conn, target), catalog.column_identity(settings, target)
        differing = [key for key in ("model", "dimensions") if held is not None and held[key] != wanted[key]]
        if differing:  # vectors of two models are not comparable: the nearest rows would be noise
            raise ConfigError(
                f"{target.display}.{target.embedding_column} holds {catalog.describe_identity(held, differing)}; "
                f"a {catalog.describe_identity(wanted, differing, 'query')} cannot be compared with them: "
                "search with the model and dimensions that filled the column"
            )
        embedder = make_embedder(settings, target.dimensions)
        try:
            vector = embedder.embed([query]).vectors[0]
        finally:
            embedder.close()
        if target.dimensions and vector.shape[0] != target.dimensions:
            raise DatabaseError(
                f"{target.display}.{target.embedding_column} is {target.column_type} but the query "
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


RESET_CHUNK_ROWS = 10_000


def _refuse_if_busy(conn, target, outcome):
    """A run or a pending batch would write the old model's vectors into the cleared column."""
    with conn.cursor() as cur:
        cur.execute(db.load_sql("column_busy"), {"table_name": target.qualified_name})
        runs, batches = cur.fetchone()
    conn.rollback()
    if runs or batches:
        what = f"{runs} run(s) with a live lease" if runs else f"{batches} pending --batch-api batch(es)"
        advice = (
            "stop them (`python etl.py status` lists them)"
            if runs
            else ("land them (rerun --batch-api) or `python etl.py batches cancel`")
        )
        raise DatabaseError(f"{what} on {target.display}: {advice} before init --reset-column; {outcome}")


def reset_column(settings, out):
    """`init --reset-column --yes`: set the column to NULL in committed chunks of ids, then forget
    what it held and the table's failed rows, so that a run of another model may fill it."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        # Held until the connection closes: a run that starts meanwhile refuses (catalog.guard_column).
        if not catalog.scalar(
            conn, "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (catalog.RESET_LOCK_KEY, target.qualified_name)
        ):
            raise DatabaseError(f"another init --reset-column is clearing {target.display} now: wait for it to end")
        _refuse_if_busy(conn, target, "nothing was cleared")
        query, after, cleared = target.query("clear_chunk"), None, 0
        while True:
            with conn.cursor() as cur:
                cur.execute(query, {"after": after, "limit": RESET_CHUNK_ROWS})
                after, count = cur.fetchone()
            conn.commit()
            cleared += count
            if after is None:
                break
        with conn.cursor() as cur:
            cur.execute(
                db.load_sql("forget_column"),
                {"table_name": target.qualified_name, "column_name": target.embedding_column},
            )
        conn.commit()
        _refuse_if_busy(conn, target, "it may have written vectors meanwhile: run the reset again once it stops")
    except psycopg2.Error as error:
        raise DatabaseError(f"reset failed: {db.first_line(error)}") from error
    finally:
        conn.close()
    print(
        f"column {target.display}.{target.embedding_column}: {cleared} vectors set to NULL; "
        "its record and the table's rows in etl_failures cleared",
        file=out,
    )
    return EXIT_OK
