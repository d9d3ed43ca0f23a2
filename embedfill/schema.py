"""The tool's own tables (etl_*), at a schema version: created and migrated before anything else.

sql/schema/NNN_*.sql are applied in order, each once; etl_schema holds the number of the
last one. A newer tool on an older database applies the files it has and the database lacks, in
one transaction under an advisory lock (two runs started together: one migrates, the other waits
and finds nothing left to do); an older tool refuses a database a newer one has migrated.
"""

from .db import SQL_DIR, Connection, load_sql
from .errors import DatabaseError

LOCK_KEY = 0x656D6266  # "embf": one migration at a time in a database
MIGRATIONS = sorted(path.stem for path in (SQL_DIR / "schema").glob("[0-9][0-9][0-9]_*.sql"))  # the others: queries
VERSION = int(MIGRATIONS[-1][:3])  # this tool's schema


def version(conn: Connection) -> int:
    """The schema version of the database's etl_* tables (0: none, or made before versions existed)."""
    with conn.cursor() as cur:
        cur.execute(load_sql("schema/exists"))
        if not cur.fetchone()[0]:
            return 0
        cur.execute(load_sql("schema/version"))
        return cur.fetchone()[0]


def ensure(conn: Connection, commit: bool = True) -> list[str]:
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
        cur.execute(load_sql("schema/lock"), {"lock_key": LOCK_KEY})
        found = version(conn)  # again, under the lock: another run may have migrated meanwhile
        for name in MIGRATIONS:
            if int(name[:3]) > found or not found:  # 000 makes etl_schema itself
                cur.execute(load_sql(f"schema/{name}"))
                applied.append(name)
        if found < VERSION:
            cur.execute(load_sql("schema/record_version"), {"version": VERSION})
    if commit:
        conn.commit()
    return applied
