"""`etl.py init`: what the tool creates in the user's database, checked first and said: the vector
extension, the tool's etl_* tables, the embedding column, the partial index, the change-tracking
trigger; and `init --reset-column`, which clears a column for another model."""

import logging
from typing import TYPE_CHECKING, TextIO, cast

import psycopg2
from psycopg2 import sql

from . import catalog, db, guard, indexes, schema
from .errors import EXIT_OK, ConfigError, DatabaseError

if TYPE_CHECKING:
    from .catalog import Target
    from .settings import Settings

log = logging.getLogger(__name__)


def init_schema(
    settings: "Settings",
    out: TextIO,
    vector_type: str = "vector",
    restore_index: bool = False,
    tracking: str | None = None,
) -> int:
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
            cur.execute(db.load_sql("schema/lock"), {"lock_key": schema.LOCK_KEY})
            cur.execute(db.load_sql("table/vector_extension"))
            installed, _ = cur.fetchone()
            cur.execute(db.load_sql("table/tool_tables"))
            before = [name for (name,) in cur.fetchall()]
            cur.execute(db.load_sql("table/extension"))
            schema.ensure(conn, commit=False)
            cur.execute(db.load_sql("table/tool_tables"))
            created = [name for (name,) in cur.fetchall() if name not in before]
            if add_column:
                cur.execute(
                    sql.SQL(db.load_sql("table/add_embedding_column")).format(
                        table=sql.Identifier(*catalog.split_table_name(cast(str, settings.table))),
                        embedding=sql.Identifier(settings.embedding_column),
                        dimensions=sql.Literal(settings.dimensions),
                        vector_type=sql.SQL(vector_type),
                    )
                )
            cur.execute(db.load_sql("table/vector_extension"))
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
                cur.execute(target.query("table/partial_index", index=sql.Identifier(index), concurrently=how))
            print(f"partial index {index}: created", file=out)
        if tracking == "track":
            kept = guard.keep_column(conn, settings, target)
            with conn.cursor() as cur:
                cur.execute(_tracking_query("sync/track_changes", target))
            print(
                f"change tracking: on (trigger {catalog.tracking_name(target)[1]} nulls the vector of a row whose "
                "text changes and wakes `--follow` runs)",
                file=out,
            )
            print(kept, file=out)
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


def _check_init(conn: db.Connection, settings: "Settings", vector_type: str, tracking: str | None) -> bool:
    """What `init` could fail on, checked before it creates anything; True when the column is to be added."""
    parts = catalog.split_table_name(cast(str, settings.table))
    shown = ".".join(parts)
    relation = catalog.relation_literal(conn, parts)
    with conn.cursor() as cur:
        cur.execute(db.load_sql("table/vector_extension"))
        installed, available = cur.fetchone()
        cur.execute(db.load_sql("table/table_columns"), {"relation": relation})
        columns = {row[0] for row in cur.fetchall()}
        cur.execute(db.load_sql("table/table_owner"), {"relation": relation})
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
            (column, "ETL_TEXT_COLUMNS or --text-columns") for column in settings.text_columns or ()
        ]:
            if column not in columns:
                raise DatabaseError(f"column {shown}.{column} does not exist (check {where})")
        unique = {"relation": relation, "id_column": settings.id_column}
        if not catalog.scalar(conn, db.load_sql("table/id_is_unique"), unique):
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


def untrack(settings: "Settings", out: TextIO) -> int:
    """Remove the change-tracking trigger and its function (`init --untrack`)."""
    conn = db.connect(settings.database_url)
    conn.autocommit = True
    try:
        target = catalog.inspect_target(conn, settings)
        with conn.cursor() as cur:
            cur.execute(_tracking_query("sync/untrack_changes", target))
    except psycopg2.Error as error:
        raise DatabaseError(f"init --untrack failed: {db.first_line(error)}") from error
    finally:
        conn.close()
    print(f"change tracking: off (trigger {catalog.tracking_name(target)[1]} removed)", file=out)
    return EXIT_OK


def _tracking_query(name: str, target: "Target") -> sql.Composed:
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


RESET_CHUNK_ROWS = 10_000


def _refuse_if_busy(conn: db.Connection, target: "Target", outcome: str) -> None:
    """A run or a pending batch would write the old model's vectors into the cleared column."""
    with conn.cursor() as cur:
        cur.execute(db.load_sql("guard/column_busy"), {"table_name": target.qualified_name})
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


def reset_column(settings: "Settings", out: TextIO) -> int:
    """`init --reset-column --yes`: set the column to NULL in committed chunks of ids, then forget
    what it held and the table's failed rows, so that a run of another model may fill it."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        # Held until the connection closes: a run that starts meanwhile refuses (guard.guard_column).
        if not catalog.scalar(
            conn,
            db.load_sql("guard/reset_lock"),
            {"lock_key": guard.RESET_LOCK_KEY, "table_name": target.qualified_name},
        ):
            raise DatabaseError(f"another init --reset-column is clearing {target.display} now: wait for it to end")
        _refuse_if_busy(conn, target, "nothing was cleared")
        query, after, cleared = target.query("table/clear_chunk"), None, 0
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
                db.load_sql("guard/forget_column"),
                {"table_name": target.qualified_name, "column_name": target.embedding_column},
            )
        conn.commit()
        with conn.cursor() as cur:
            cur.execute(target.query("table/analyze_column"))
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
