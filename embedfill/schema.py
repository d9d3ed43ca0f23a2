"""The tool's own tables (etl_*), at a schema version: created and migrated before anything else.

sql/migrations/NNN_*.sql are applied in order, each once; etl_schema holds the number of the
last one. A newer tool on an older database applies the files it has and the database lacks, in
one transaction under an advisory lock (two runs started together: one migrates, the other waits
and finds nothing left to do); an older tool refuses a database a newer one has migrated.
"""

from .db import SQL_DIR, load_sql
from .errors import DatabaseError

LOCK_KEY = 0x656D6266  # "embf": one migration at a time in a database
MIGRATIONS = sorted(path.stem for path in (SQL_DIR / "migrations").glob("[0-9][0-9][0-9]_*.sql"))
VERSION = int(MIGRATIONS[-1][:3])  # this tool's schema


# pg_class read through SQL, not to_regclass: after waiting on an advisory lock, a session's
# catalog cache may not know yet of a table another session created and committed meanwhile.
_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = 'etl_schema' AND n.nspname = ANY (current_schemas(false)))"
)


def version(conn):
    """The schema version of the database's etl_* tables (0: none, or made before versions existed)."""
    with conn.cursor() as cur:
        cur.execute(_EXISTS)
        if not cur.fetchone()[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM etl_schema")
        return cur.fetchone()[0]


def ensure(conn, commit=True):
    """Bring the etl_* tables to this tool's version and commit (the caller's open work too), or,
    with commit=False, leave that to the caller's transaction (`init`: one transaction for all it
    creates); when they are there already, only read. Returns the migrations applied (names)."""
    found = version(conn)
    if found == VERSION:
        return []
    if found > VERSION:
        raise DatabaseError(
            f"the etl_* tables of this database are at schema version {found}, newer than this tool's {VERSION}: "
            "a newer embedfill has used this database; upgrade this one"
        )
    applied = []
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        found = version(conn)  # again, under the lock: another run may have migrated meanwhile
        for name in MIGRATIONS:
            if int(name[:3]) > found or not found:  # 000 makes etl_schema itself
                cur.execute(load_sql(f"migrations/{name}"))
                applied.append(name)
        if found < VERSION:
            cur.execute("INSERT INTO etl_schema (version) VALUES (%s)", (VERSION,))
    if commit:
        conn.commit()
    return applied
