"""The verbs around the backfill: `init` (schema), `status` (where a run stands), `search`, `embed`."""

import json
import logging

import numpy as np
import psycopg2
from pgvector.psycopg2 import register_vector
from psycopg2 import sql

from . import catalog, db, indexes, schema
from .errors import EXIT_OK, ConfigError, DatabaseError
from .providers import make_embedder
from .texts import row_text

log = logging.getLogger(__name__)


def init_schema(settings, out, vector_type="vector", restore_index=False, tracking=None):
    """`init`: check everything that can fail first, then create what is missing and say so: the
    vector extension, the tool's etl_* tables and the column (with --dimensions) in one transaction,
    then the change-tracking trigger (tracking="track") and the partial index (CREATE INDEX
    CONCURRENTLY cannot run in a transaction). tracking="untrack" only removes the trigger."""
    if tracking == "untrack":
        return untrack(settings, out)
    conn = db.connect(settings.database_url)
    try:
        add_column = _check_init(conn, settings, vector_type, tracking)  # nothing is created before this passes
        with conn.cursor() as cur:  # one transaction: a failure leaves nothing behind
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (schema.LOCK_KEY,))
            cur.execute(db.load_sql("vector_extension"))
            installed, _ = cur.fetchone()
            cur.execute(db.load_sql("tool_tables"))
            before = [name for (name,) in cur.fetchall()]
            cur.execute(db.load_sql("extension"))
            schema.ensure(conn, commit=False)
            cur.execute(db.load_sql("tool_tables"))
            created = [name for (name,) in cur.fetchall() if name not in before]
            if add_column:
                cur.execute(
                    sql.SQL(db.load_sql("add_embedding_column")).format(
                        table=sql.Identifier(*catalog.split_table_name(settings.table)),
                        embedding=sql.Identifier(settings.embedding_column),
                        dimensions=sql.Literal(settings.dimensions),
                        vector_type=sql.SQL(vector_type),
                    )
                )
            cur.execute(db.load_sql("vector_extension"))
            version = cur.fetchone()[0]
        conn.commit()
        print(f"extension vector {version}: {'present' if installed else 'created'}", file=out)
        if created:
            print(f"tables created: {', '.join(created)} (the tool's ledger, leases and records)", file=out)
        else:
            print(f"tables: present ({', '.join(before)})", file=out)
        if add_column:
            print(f"column {settings.embedding_column}: added as {vector_type}({settings.dimensions})", file=out)
        conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run inside a transaction
        target = catalog.inspect_target(conn, settings)
        if not add_column:
            print(f"column {target.embedding_column}: present, {target.column_type}", file=out)
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


def _check_init(conn, settings, vector_type, tracking):
    """What `init` could fail on, checked before it creates anything; True when the column is to be added."""
    parts = catalog.split_table_name(settings.table)
    shown = ".".join(parts)
    relation = catalog.relation_literal(conn, parts)
    with conn.cursor() as cur:
        cur.execute(db.load_sql("vector_extension"))
        installed, available = cur.fetchone()
        cur.execute(db.load_sql("table_columns"), {"relation": relation})
        columns = {row[0] for row in cur.fetchall()}
        cur.execute(db.load_sql("table_owner"), {"relation": relation})
        owner = cur.fetchone()
    conn.rollback()
    if not installed and not available:
        raise DatabaseError(
            f"the vector extension (pgvector) is not available on the server of {conn.info.dbname}: install pgvector "
            "there (https://github.com/pgvector/pgvector#installation), or use another server; nothing was created"
        )
    if not columns:
        raise DatabaseError(f"table {shown} does not exist (check ETL_TABLE or --table)")
    if tracking == "track" and not settings.text_columns:
        raise ConfigError("init --track-changes needs the text columns: set ETL_TEXT_COLUMNS or --text-columns")
    add_column = settings.embedding_column not in columns
    if add_column:
        if not settings.dimensions:
            raise DatabaseError(
                f"column {shown}.{settings.embedding_column} does not exist: "
                f"pass --dimensions N (or set EMBEDDING_DIMENSIONS) to add it as {vector_type}(N)"
            )
        for column, where in [(settings.id_column, "ETL_ID_COLUMN or --id-column")] + [
            (column, "ETL_TEXT_COLUMNS or --text-columns") for column in settings.text_columns
        ]:
            if column not in columns:
                raise DatabaseError(f"column {shown}.{column} does not exist (check {where})")
        unique = {"relation": relation, "id_column": settings.id_column}
        if not catalog.scalar(conn, db.load_sql("id_is_unique"), unique):
            raise DatabaseError(
                f"column {shown}.{settings.id_column} is not known to be unique: it needs a primary key or a unique "
                "index on it alone (add one, or set ETL_ID_COLUMN); nothing was created"
            )
    else:
        catalog.inspect_target(conn, settings)  # the column's type, the id's uniqueness, the text columns
    if not owner[0]:
        raise DatabaseError(
            f"table {shown} belongs to another role: init creates an index (and a trigger) on it, which only its "
            "owner may do; run init as the owner"
        )
    return add_column


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


def show_status(settings, out, top=5, as_json=False):
    """Rows total (estimate), rows still NULL, failures and their reasons, active runs; as text or JSON."""
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
            oldest = None
            if settings.updated_column:
                try:
                    cur.execute(target.query("oldest_null", updated=sql.Identifier(settings.updated_column)))
                except psycopg2.Error as error:
                    raise DatabaseError(
                        f"cannot read {target.display}.{settings.updated_column}: {db.first_line(error)} "
                        "(check ETL_UPDATED_COLUMN)"
                    ) from error
                oldest = cur.fetchone()[0]
                tracking += f" oldest_null_age={(oldest or 'none').replace(' ', '_')}"
        conn.rollback()
        holds, record = catalog.describe_column(conn, target), catalog.column_record(conn, target)
        from .batchapi import status_lines  # imported here: batchapi pulls in the driver, which status needs not

        batches = status_lines(conn, target)
    finally:
        conn.close()
    if as_json:
        document = {
            "table": target.display,
            "column": target.embedding_column,
            "rows_total_estimate": estimate if estimate >= 0 else None,
            "rows_null": null_rows,
            "rows_failed": failed,
            "active_runs": runs,
            "active_processes": processes,
            "run_active": bool(runs),
            "tracking": tracking.startswith("on"),
            "oldest_null_age": oldest,
            "holds": record,
            "runs": [
                {"run": run_id, "share": f"1/{count}", "tpm": tpm, "rpm": rpm, "running_for": age}
                for run_id, tpm, rpm, count, age in leases
            ],
            "deferred_indexes": [{"index": name, "dropped_ago": age} for _, name, _, age in waiting],
            "failures": [{"reason": reason, "rows": count} for reason, count in reasons],
            "batches": batches,
        }
        print(json.dumps(document, ensure_ascii=False, default=str), file=out)
        return EXIT_OK
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


def query_vector(conn, settings, target, text, verb="search"):
    """The vector of `text` by the configured provider, and the model that made it; refused when
    the column holds vectors of another model or dimension count (they would not compare)."""
    held, wanted = catalog.column_record(conn, target), catalog.column_identity(settings, target)
    differing = [key for key in ("model", "dimensions") if held is not None and held[key] != wanted[key]]
    if differing:  # vectors of two models are not comparable: the nearest rows would be noise
        raise ConfigError(
            f"{target.display}.{target.embedding_column} holds {catalog.describe_identity(held, differing)}; "
            f"a {catalog.describe_identity(wanted, differing, 'query')} cannot be compared with them: "
            f"{verb} with the model and dimensions that filled the column"
        )
    embedder = make_embedder(settings, target.dimensions)
    try:
        vector = embedder.embed([text]).vectors[0]
    finally:
        embedder.close()
    if target.dimensions and vector.shape[0] != target.dimensions:
        raise DatabaseError(
            f"{target.display}.{target.embedding_column} is {target.column_type} but the query "
            f"embedding has {vector.shape[0]} dimensions; use the provider and model the table was filled with"
        )
    return vector, wanted["model"]


def search(settings, query, top, out, as_json=False):
    """Embed `query` with the configured provider and print the nearest rows (as text, or one JSON document)."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        vector, model = query_vector(conn, settings, target, query)
        register_vector(conn)
        with conn.cursor() as cur:
            cur.execute(target.query("nearest"), {"query": vector, "top": top})
            rows = cur.fetchall()
        conn.rollback()
    finally:
        conn.close()
    if as_json:
        document = {
            "table": target.display,
            "column": target.embedding_column,
            "model": model,
            "dimensions": int(vector.shape[0]),
            "query": query,
            "rows": [
                {"id": row_id, "distance": distance, "text": row_text(values)} for row_id, *values, distance in rows
            ],
        }
        print(json.dumps(document, ensure_ascii=False), file=out)
        return EXIT_OK
    if not rows:
        print(f"no embedded rows in {target.display} yet: run `python etl.py` first", file=out)
    for row_id, *values, distance in rows:
        text = row_text(values).replace("\n", " | ")
        print(f"{distance:.4f}  {row_id}  {text[:120]}", file=out)
    return EXIT_OK


def embed(settings, text, out):
    """`embed TEXT`: {"model", "dimensions", "embedding"} of the vector the column's model makes for it."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        vector, model = query_vector(conn, settings, target, text, verb="embed")
    finally:
        conn.close()
    # Each float32 by its shortest repr: it reads back as the same float32.
    values = ",".join(str(value) for value in vector.astype(np.float32))
    print(f'{{"model": {json.dumps(model)}, "dimensions": {vector.shape[0]}, "embedding": [{values}]}}', file=out)
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
