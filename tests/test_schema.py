"""The tool's own tables have a schema version: a newer tool migrates a database an older one made
(its rows kept and honoured), once, and refuses a database a newer tool has migrated."""

from psycopg2 import sql

from tests.conftest import check_table, env_for_table, make_foods
from tests.test_errors import one_line_error

DIMS = {"EMBEDDING_DIMENSIONS": 8}

# The etl_* tables as the tool made them before schema versions existed (sql/ledger.sql of 603ab5c).
BEFORE_VERSIONS = """
CREATE TABLE etl_failures (table_name text NOT NULL, row_id text NOT NULL, reason text NOT NULL,
    attempts int NOT NULL DEFAULT 1, first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (table_name, row_id));
CREATE TABLE etl_runs (run_id text PRIMARY KEY, key_hash text NOT NULL, table_name text NOT NULL, tpm float8,
    rpm float8, started timestamptz NOT NULL DEFAULT now(), lease_until timestamptz NOT NULL);
CREATE TABLE etl_deferred_indexes (table_name text NOT NULL, schema_name text NOT NULL, index_name text NOT NULL,
    definition text NOT NULL, dropped_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (schema_name, index_name));
CREATE TABLE etl_columns (table_name text NOT NULL, column_name text NOT NULL, model text NOT NULL, dimensions int,
    provider text NOT NULL, recipe text[] NOT NULL, origin_unknown boolean NOT NULL DEFAULT false,
    recorded timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (table_name, column_name));
CREATE TABLE etl_batches (key text PRIMARY KEY, table_name text NOT NULL, input_file_id text, batch_id text,
    state text NOT NULL DEFAULT 'submitting', row_count int NOT NULL, attempts int NOT NULL DEFAULT 1,
    request_counts text, created timestamptz NOT NULL DEFAULT now(), updated timestamptz NOT NULL DEFAULT now());
CREATE TABLE etl_batch_rows (table_name text NOT NULL, row_id text NOT NULL, batch_key text NOT NULL, request int,
    position int, PRIMARY KEY (table_name, row_id));
CREATE INDEX etl_batch_rows_key_idx ON etl_batch_rows (batch_key, request, position);
"""


def rows(db, query):
    with db.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def test_a_database_of_the_tool_before_versions_is_migrated_with_its_rows(etl, db):
    from embedfill.schema import VERSION

    make_foods(db, 60)
    with db.cursor() as cur:
        cur.execute(BEFORE_VERSIONS)
        cur.execute("INSERT INTO etl_failures (table_name, row_id, reason) VALUES ('public.foods', '7', 'empty text')")
        cur.execute(
            "INSERT INTO etl_columns (table_name, column_name, model, dimensions, provider, recipe) VALUES "
            "('public.foods', 'embedding', 'text-embedding-3-small', 8, '127.0.0.1', "
            "ARRAY['name', 'category', 'description'])"
        )
        cur.execute(
            "INSERT INTO etl_batches (key, table_name, batch_id, state, row_count) "
            "VALUES ('embedfill-old', 'public.foods', 'batch_old', 'in_progress', 2)"
        )
        cur.execute(
            "INSERT INTO etl_batch_rows (table_name, row_id, batch_key) "
            "VALUES ('public.foods', '8', 'embedfill-old'), ('public.foods', '9', 'embedfill-old')"
        )
    result = etl.run("--workers", "2", "--batch-size", "10", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert rows(db, "SELECT version FROM etl_schema") == [(VERSION,)]
    assert rows(db, "SELECT to_regclass('etl_claims') IS NOT NULL") == [(True,)]
    embedded, null = check_table(db)
    assert sorted(null, key=int) == ["7", "8", "9"]  # the ledger's row and the pending batch's, left alone
    assert len(embedded) == 57
    assert "skipped_known_failures=1" in result.stdout
    assert rows(db, "SELECT model, claimed_by FROM etl_columns") == [("text-embedding-3-small", None)]
    refused = etl.run(**env_for_table(EMBEDDING_MODEL="text-embedding-3-large", **DIMS))  # the old record holds
    assert refused.returncode == 1 and "this run would add" in one_line_error(refused)
    again = etl.run(**env_for_table(**DIMS))
    assert again.returncode == 0, again.stderr
    assert rows(db, "SELECT count(*) FROM etl_schema") == [(1,)]  # migrated once


def test_a_database_a_newer_tool_migrated_is_refused(etl, db):
    make_foods(db, 10)
    assert etl.run(**env_for_table(**DIMS)).returncode == 0
    with db.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO etl_schema (version) VALUES (99)"))
        cur.execute("UPDATE foods SET embedding = NULL")
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 1
    assert one_line_error(result).startswith(
        "error: the etl_* tables of this database are at schema version 99, newer than this tool's"
    )
    assert rows(db, "SELECT count(*) FROM foods WHERE embedding IS NOT NULL") == [(0,)]
