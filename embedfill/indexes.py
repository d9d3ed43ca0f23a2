"""Vector indexes (HNSW, IVFFlat) on the embedding column: said before a run, dropped and rebuilt with --defer-index.

Every row written into a column with such an index is inserted into the index too, which costs
far more than the write (the bench measures it). With --defer-index the definition is recorded
in etl_deferred_indexes in the same transaction that drops the index, so it is never lost; the
last run on the table to finish rebuilds it with CREATE INDEX CONCURRENTLY (search keeps
working meanwhile, without the index), and any later run or `init --restore-index` rebuilds
what an interrupted run left recorded.
"""

import logging
import re
import time

import psycopg2
from psycopg2 import sql

from . import catalog, db
from .errors import DatabaseError
from .lease import RENEW_SECONDS

log = logging.getLogger(__name__)

REBUILD_LOCK_KEY = 0x656D6269  # "embi", with the table's hash: one rebuild at a time per table


def vector_indexes(conn, target):
    """[(schema, name, definition)] of the HNSW/IVFFlat indexes on the embedding column."""
    relation = catalog.relation_literal(conn, target.name_parts)
    with conn.cursor() as cur:
        cur.execute(db.load_sql("vector_indexes"), {"relation": relation, "embedding_column": target.embedding_column})
        rows = cur.fetchall()
    conn.rollback()
    return rows


def deferred(conn, target):
    """[(schema, name, definition, age)] of the indexes dropped by --defer-index, waiting to be rebuilt."""
    with conn.cursor() as cur:
        cur.execute(db.load_sql("deferred_indexes"), {"table_name": target.qualified_name})
        rows = cur.fetchall()
    conn.rollback()
    return rows


def prepare(conn, target, settings):
    """Before the first request: say which vector indexes the writes will feed, and with
    --defer-index record and drop them (one transaction: the definition is never lost)."""
    live = vector_indexes(conn, target)
    waiting = deferred(conn, target)
    if waiting:
        names = ", ".join(name for _, name, _, _ in waiting)
        log.info("index %s, dropped by an earlier --defer-index run, is rebuilt when this run ends", names)
    if not live:
        return
    names = ", ".join(name for _, name, _ in live)
    if not settings.defer_index or settings.dry_run:
        log.warning(
            "%s has a vector index on %s (%s): every row written is inserted into it, several times slower "
            "than the write itself (README: Vector indexes). Keep it (search stays fast during the run) or "
            "rerun with --defer-index to drop it now and rebuild it at the end",
            target.display,
            target.embedding_column,
            names,
        )
        return
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '10s'")
            for schema, name, definition in live:
                cur.execute(
                    "INSERT INTO etl_deferred_indexes (table_name, schema_name, index_name, definition) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (target.qualified_name, schema, name, definition),
                )
                cur.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, name)))
        conn.commit()
    except psycopg2.Error as error:
        conn.rollback()
        raise DatabaseError(f"could not drop {names} for --defer-index: {db.first_line(error)}") from error
    log.info("--defer-index: dropped %s (recorded in etl_deferred_indexes); rebuilt when the run ends", names)


def restore(settings, target, own_run=None):
    """Rebuild the recorded indexes of the table unless another run on it is still alive (the last
    one to finish rebuilds them). Returns the names rebuilt."""
    conn = db.connect(settings.database_url)
    conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run inside a transaction
    rebuilt = []
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
            cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (REBUILD_LOCK_KEY, target.qualified_name))
            if not cur.fetchone()[0]:
                log.info("another process is rebuilding the vector indexes of %s", target.display)
                return rebuilt
            for key in ("maintenance_work_mem", "max_parallel_maintenance_workers"):
                value = getattr(settings, key)
                if value is not None:
                    cur.execute("SELECT set_config(%s, %s, false)", (key, str(value)))
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


def _others_alive(cur, target, own_run):
    """Whether another run on the table renews its lease: a run killed a moment ago still has
    one, so leases are read twice, a renewal apart (waiting only when there are any)."""
    query = "SELECT run_id, lease_until FROM etl_runs WHERE table_name = %s AND lease_until > now() AND run_id <> %s"
    cur.execute(query, (target.qualified_name, own_run or ""))
    before = dict(cur.fetchall())
    if not before:
        return False
    time.sleep(2 * RENEW_SECONDS + 1)
    cur.execute(query, (target.qualified_name, own_run or ""))
    return any(run_id not in before or until > before[run_id] for run_id, until in cur.fetchall())


def _rebuild(cur, target, schema, name, definition):
    index = sql.Identifier(schema, name)
    cur.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (index.as_string(cur),))
    state = cur.fetchone()
    if state and not state[0]:  # an interrupted CREATE INDEX CONCURRENTLY leaves an invalid index
        cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index))
    if not state or not state[0]:
        started = time.monotonic()
        log.info("rebuilding index %s on %s (CREATE INDEX CONCURRENTLY): it can take a while", name, target.display)
        cur.execute(re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", definition))
        log.info("index %s rebuilt in %.1f s", name, time.monotonic() - started)
    cur.execute("DELETE FROM etl_deferred_indexes WHERE schema_name = %s AND index_name = %s", (schema, name))
