"""Vector indexes (HNSW, IVFFlat) on the embedding column: said before a run, dropped and rebuilt with --defer-index.

Every row written into a column with such an index is inserted into the index too, which costs
far more than the write (the bench measures it). With --defer-index the definition is recorded
in etl_deferred_indexes and committed before the index is dropped (CONCURRENTLY), so it is never
lost; the last run on the table to finish rebuilds it with CREATE INDEX CONCURRENTLY (search
keeps working meanwhile, without the index), and any later run or `init --restore-index`
rebuilds what an interrupted run left recorded. Dropping and rebuilding happen under one
advisory lock per table, so two hosts never drop what the other is rebuilding.
"""

import logging
import re
import signal
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import psycopg2
from psycopg2 import sql

from . import catalog, db
from .errors import DatabaseError, EtlError, FatalProviderError, Stop
from .lease import RENEW_SECONDS

if TYPE_CHECKING:
    from .catalog import Target
    from .settings import Settings
    from .shape import Shape

log = logging.getLogger(__name__)

LOCK_KEY = 0x656D6269  # "embi", with the table's hash: one drop or rebuild at a time per table
DEFINITION = re.compile(r"CREATE (UNIQUE )?INDEX (\S+|\"(?:[^\"]|\"\")+\") ON ")


def vector_indexes(conn: db.Connection, target: "Target") -> list[tuple[str, str, str]]:
    """[(schema, name, definition)] of the valid HNSW/IVFFlat indexes on the embedding column,
    each definition schema-qualified throughout (read with an empty search_path, as pg_dump does)."""
    relation = catalog.relation_literal(conn, target.name_parts)
    with conn.cursor() as cur:
        cur.execute(db.load_sql("index/table_oid"), {"relation": relation})  # before the search_path is emptied
        table = cur.fetchone()[0]
        cur.execute(db.load_sql("index/vector_indexes"), {"table": table, "embedding_column": target.embedding_column})
        rows = cur.fetchall()
    conn.rollback()
    return rows


def deferred(conn: db.Connection, target: "Target") -> list[tuple[str, str, str, timedelta]]:
    """[(schema, name, definition, age)] of the indexes dropped by --defer-index, waiting to be rebuilt."""
    with conn.cursor() as cur:
        cur.execute(db.load_sql("index/deferred_indexes"), {"table_name": target.qualified_name})
        rows = cur.fetchall()
    conn.rollback()
    return rows


def prepare(conn: db.Connection, target: "Target", settings: "Settings", shape: "Shape") -> None:
    """Before the first request: say which vector indexes the writes will feed, and with
    --defer-index (once a request has shown that the provider answers, asked as `shape` says)
    record, then drop them."""
    waiting = deferred(conn, target)
    if waiting:
        names = ", ".join(name for _, name, _, _ in waiting)
        log.info("index %s, dropped by an earlier --defer-index run, is rebuilt when this run ends", names)
    live = vector_indexes(conn, target)
    if not live:
        return
    names = ", ".join(name for _, name, _ in live)
    if not settings.defer_index or settings.dry_run or settings.limit is not None:
        why = "" if not settings.defer_index else " (not now: --dry-run)" if settings.dry_run else " (not with --limit)"
        log.warning(
            "%s has a vector index on %s (%s): every row written is inserted into it, several times slower than "
            "the write itself (docs/columns-and-indexes.md). Keep it (search stays fast during the run) or run with "
            "--defer-index to drop it for the run and rebuild it at the end, with --index-memory large enough "
            "for the whole index (else the rebuild can take longer than the inserts)%s",
            target.display,
            target.embedding_column,
            names,
            why,
        )
        return
    _probe(settings, target, shape)
    conn.autocommit = True  # DROP INDEX CONCURRENTLY: app queries on the table are never queued behind it
    try:
        with conn.cursor() as cur:
            lock = {"lock_key": LOCK_KEY, "table_name": target.qualified_name}
            cur.execute(db.load_sql("index/lock"), lock)
            try:
                for schema, name, definition in live:
                    place = {"schema_name": schema, "index_name": name, "definition": definition}
                    cur.execute(db.load_sql("index/record_deferred"), {**lock, **place})
                    cur.execute(_drop(schema, name))
            finally:
                cur.execute(db.load_sql("index/unlock"), lock)
    except psycopg2.Error as error:
        raise DatabaseError(f"could not drop {names} for --defer-index: {db.first_line(error)}") from error
    finally:
        conn.autocommit = False
    log.info("--defer-index: dropped %s (recorded in etl_deferred_indexes); rebuilt when the run ends", names)


def _probe(settings: "Settings", target: "Target", shape: "Shape") -> None:
    """One request before an index is dropped, asked as the run will ask: a wrong key, model,
    deployment or dimension stops the run while the index is still there."""
    from .lessons import embed_once
    from .providers import make_embedder

    embedder = make_embedder(settings, target.dimensions)
    try:
        width = embed_once(embedder, shape, "embedfill --defer-index probe").shape[0]
    except EtlError as error:
        raise EtlError(f"{error} (the vector index was not dropped)") from error
    finally:
        embedder.close()  # no socket crosses the fork
    mismatch = target.width_error(settings, width, bool(shape["no_dimensions"]))  # not `error`: the except clause's
    if mismatch:
        raise FatalProviderError(f"{mismatch} (the index was not dropped)")


def say_waiting(settings: "Settings", target: "Target") -> None:
    """After a run that did not rebuild: name the indexes that stay dropped (one log line)."""
    try:
        conn = db.connect(settings.database_url, timeout=3)  # after a stop: a database away costs 3 s at most
        try:
            names = ", ".join(name for _, name, _, _ in deferred(conn, target))
        finally:
            conn.close()
    except (psycopg2.Error, EtlError):
        return
    if names:
        log.warning("index %s stays dropped until a run ends or `python etl.py init --restore-index`", names)


def restore(settings: "Settings", target: "Target", own_run: str | None = None) -> list[str]:
    """Rebuild the recorded indexes of the table unless another run on it is still alive (the last
    one to finish rebuilds them). Returns the names rebuilt."""
    conn = db.connect(settings.database_url)
    conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run inside a transaction
    rebuilt: list[str] = []
    try:
        waiting = deferred(conn, target)
        with conn.cursor() as cur:
            if not waiting:
                return rebuilt
            if _others_alive(cur, target, own_run):
                log.info(
                    "other runs on %s are alive: the last one to finish rebuilds its vector indexes", target.display
                )
                return rebuilt
            cur.execute(db.load_sql("index/try_lock"), {"lock_key": LOCK_KEY, "table_name": target.qualified_name})
            if not cur.fetchone()[0]:
                log.info("another process is dropping or rebuilding the vector indexes of %s", target.display)
                return rebuilt
            for key in ("maintenance_work_mem", "max_parallel_maintenance_workers"):
                value = getattr(settings, key)
                if value is not None:
                    cur.execute(db.load_sql("index/set_config"), {"name": key, "value": str(value)})
            for schema, name, definition, _ in deferred(conn, target):  # again, under the lock
                _rebuild(cur, target, schema, name, definition)
                rebuilt.append(name)
    except psycopg2.Error as error:
        raise DatabaseError(
            f"could not rebuild the vector index of {target.display}: {db.first_line(error)}; it stays recorded in "
            "etl_deferred_indexes: rerun, or `python etl.py init --restore-index`"
        ) from error
    finally:
        conn.close()
    return rebuilt


def _others_alive(cur: db.Cursor, target: "Target", own_run: str | None) -> bool:
    """Whether another run on the table renews its lease: a run killed a moment ago still has
    one, so leases are read twice, a renewal apart (waiting only when there are any)."""
    query, params = db.load_sql("index/other_runs"), {"table_name": target.qualified_name, "run_id": own_run or ""}
    cur.execute(query, params)
    before = dict(cur.fetchall())
    if not before:
        return False
    time.sleep(2 * RENEW_SECONDS + 1)
    cur.execute(query, params)
    return any(run_id not in before or until > before[run_id] for run_id, until in cur.fetchall())


def _rebuild(cur: db.Cursor, target: "Target", schema: str, name: str, definition: str) -> None:
    index = sql.Identifier(schema, name)
    if not DEFINITION.match(definition):
        raise DatabaseError(f"etl_deferred_indexes holds {definition[:80]!r} for {name}, not a CREATE INDEX statement")
    cur.execute(db.load_sql("index/index_state"), {"index": index.as_string(cur)})
    state = cur.fetchone()
    if state and not state[0]:  # an interrupted CREATE INDEX CONCURRENTLY leaves an invalid index
        cur.execute(_drop(schema, name))
    if not state or not state[0]:
        started = time.monotonic()
        log.info("rebuilding index %s on %s (CREATE INDEX CONCURRENTLY): it can take a while", name, target.display)
        _interruptible(cur, DEFINITION.sub(r"CREATE \1INDEX CONCURRENTLY \2 ON ", definition, count=1), name)
        log.info("index %s rebuilt in %.1f s", name, time.monotonic() - started)
    cur.execute(db.load_sql("index/forget_deferred"), {"schema_name": schema, "index_name": name})


def _drop(schema: str, name: str) -> sql.Composed:
    return sql.SQL(db.load_sql("index/drop_index")).format(index=sql.Identifier(schema, name))


def _interruptible(cur: db.Cursor, statement: str, name: str) -> None:
    """Run a long statement in a thread, so that Ctrl-C or SIGTERM cancel it at once (it may wait
    for every older transaction in the database) instead of after it ends."""
    failure = []

    def execute() -> None:
        try:
            cur.execute(statement)
        except psycopg2.Error as error:
            failure.append(error)

    previous = signal.signal(signal.SIGTERM, Stop.on_signal)
    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except (Stop, KeyboardInterrupt):
        cur.connection.cancel()
        thread.join()
        log.warning("rebuild of index %s interrupted; it stays recorded: `python etl.py init --restore-index`", name)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failure:
        raise failure[0]
