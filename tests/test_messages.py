"""Secrets and messages: no key or password in any output, advice that works when pasted, and one
line that names the cause for a read-only server, a missing extension, a misspelled column, too
many workers and a server's own error text."""

import re

import psycopg2
import pytest
from psycopg2 import sql

from tests.conftest import env_for_table, make_foods
from tests.test_errors import one_line_error

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def test_a_key_the_server_echoes_is_never_printed(etl, db):
    make_foods(db, 10)
    etl.fake.echo_key = True
    secret = "sk-live-0123456789abcdefSECRET"
    result = etl.run(OPENAI_API_KEY=secret, **env_for_table(**DIMS))
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: the API refused the key (401: Incorrect API key provided: ***); check OPENAI_API_KEY"
    )
    assert "SECRET" not in result.stdout + result.stderr
    debug = etl.run("--log-level", "DEBUG", OPENAI_API_KEY=secret, **env_for_table(**DIMS))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "SECRET" not in debug.stdout + debug.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgress://bob:hunter2-SECRET@localhost/foods",  # a misspelled scheme: libpq echoes the string
        "postgresql://bob:hunter2-SECRET@localhost:99999/foods",
        "host=localhost user=bob password=hunter2-SECRET dbname=foods port=1",
    ],
)
def test_a_database_password_is_never_printed(etl, url):
    result = etl.run(DATABASE_URL=url, **env_for_table(**DIMS))
    assert result.returncode == 1
    error = one_line_error(result)
    assert "DATABASE_URL" in error
    assert "SECRET" not in result.stdout + result.stderr


def test_the_partial_index_advice_can_be_pasted_as_it_is(etl, db):
    with db.cursor() as cur:
        cur.execute('CREATE TABLE "Food Items" ("Food ID" bigint PRIMARY KEY, "Name" text, "Embedding" vector(8))')
        cur.execute("INSERT INTO \"Food Items\" SELECT g, 'food ' || g FROM generate_series(1, 20) g")
    env = env_for_table(
        table="Food Items", columns="Name", ETL_ID_COLUMN="Food ID", ETL_EMBEDDING_COLUMN="Embedding", **DIMS
    )
    result = etl.run(**env)
    assert result.returncode == 0, result.stderr
    advice = re.search(r"Create it with: (CREATE INDEX CONCURRENTLY .*?;)", result.stderr).group(1)
    with db.cursor() as cur:
        cur.execute(advice)  # it works as printed
    rerun = etl.run(**env)
    assert "no partial index" not in rerun.stderr


def test_a_partitioned_table_is_advised_and_given_an_index_it_can_have(etl, db):
    with db.cursor() as cur:
        cur.execute(
            "CREATE TABLE foods (id bigint PRIMARY KEY, name text, category text, description text, "
            "embedding vector(8)) PARTITION BY RANGE (id)"
        )
        cur.execute("CREATE TABLE foods_low PARTITION OF foods FOR VALUES FROM (0) TO (100)")
        cur.execute("CREATE TABLE foods_high PARTITION OF foods FOR VALUES FROM (100) TO (1000)")
        cur.execute("INSERT INTO foods (id, name) SELECT g, 'food ' || g FROM generate_series(1, 300) g")
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    advice = re.search(r"Create it with: (.*?;)", result.stderr).group(1)
    assert "CONCURRENTLY" not in advice and "partitioned" in result.stderr
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = NULL")
    init = etl.run("init", **env_for_table())
    assert init.returncode == 0, init.stderr
    rerun = etl.run(**env_for_table(**DIMS))
    assert rerun.returncode == 0 and "no partial index" not in rerun.stderr


def test_a_read_only_database_says_so(etl, db):
    make_foods(db, 10)
    assert etl.run(**env_for_table(**DIMS)).returncode == 0  # the tool's tables exist: only the writes fail
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = NULL")
        cur.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(db.info.dbname))
        )
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 1
    error = one_line_error(result)
    assert "read-only" in error and "point DATABASE_URL at the primary" in error
    assert "unexpected" not in error


def test_a_database_without_pgvector_is_told_to_install_it(etl, db):
    with db.cursor() as cur:
        cur.execute("DROP EXTENSION vector")
        cur.execute("CREATE TABLE foods (id bigint PRIMARY KEY, name text, embedding real[])")
    result = etl.run(**env_for_table(columns="name", **DIMS))
    assert result.returncode == 1
    assert "the pgvector extension is not installed in" in one_line_error(result)
    assert "python etl.py init" in one_line_error(result)


def test_a_misspelled_embedding_column_is_pointed_at_the_real_one(etl, db):
    make_foods(db, 10)
    result = etl.run(**env_for_table(ETL_EMBEDDING_COLUMN="embeding", **DIMS))
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: column foods.embeding does not exist; foods has the vector column embedding "
        "(set ETL_EMBEDDING_COLUMN=embedding), or add embeding with `python etl.py init --dimensions N`"
    )


def test_too_many_workers_for_the_server_are_refused_before_anything_starts(etl, db):
    make_foods(db, 10)
    with db.cursor() as cur:
        cur.execute("SHOW max_connections")
        most = int(cur.fetchone()[0])
    result = etl.run("--workers", str(most * 2), **env_for_table(**DIMS))
    assert result.returncode == 2
    error = one_line_error(result)
    assert re.fullmatch(
        rf"error: --workers {most * 2} needs \d+ database connections, but the server leaves \d+ free "
        rf"\(max_connections {most}, \d+ in use\): lower --workers",
        error,
    ), error
    assert etl.fake.requests == 0
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NOT NULL")
        assert cur.fetchone()[0] == 0


@pytest.mark.parametrize("style", ["fastapi", "tei"])
def test_a_servers_own_error_text_is_kept(etl, db, style):
    texts = [(f"dish {i}", "POISON" if i == 4 else "cat", None) for i in range(1, 11)]
    make_foods(db, 0, ids=range(1, 11), texts=texts)
    etl.fake.error_style = style
    result = etl.run("--workers", "1", **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    with db.cursor() as cur:
        cur.execute("SELECT reason FROM etl_failures")
        assert cur.fetchall() == [("refused by the API: 400: Invalid input: the input contains refused content",)]


def test_a_second_role_sees_the_same_one_line_errors(database_url):
    """psycopg2 errors that reach the command line unexpected are one line with advice, not a class name."""
    from embedfill import db as store

    conn = store.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
    conn.commit()
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction) as caught:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE nope (id int)")
    conn.close()
    assert store.explain(caught.value) == (
        "cannot execute CREATE TABLE in a read-only transaction (the database is read-only (a standby, or "
        "default_transaction_read_only is on): point DATABASE_URL at the primary)"
    )


def test_log_format_json_is_one_object_a_line_with_the_fields_and_no_secret(etl, db):
    import json

    make_foods(db, 300)
    etl.fake.input_cap = 32  # a lesson, said as a WARNING
    flags = ("--log-format", "json", "--batch-size", "64", "--progress-interval", "0.2")
    result = etl.run(*flags, **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    assert all({"time", "level", "column", "worker", "message"} <= line.keys() for line in lines)
    lesson = [line for line in lines if "inputs a request" in line["message"]]
    assert len(lesson) == 1 and lesson[0]["level"] == "WARNING" and lesson[0]["column"] == "foods.embedding"
    assert lesson[0]["worker"].startswith("w")
    progress = [line for line in lines if line["message"].startswith("progress ")]
    assert progress and progress[-1]["embedded"] == 300 and progress[-1]["failed"] == 0
    secret = "sk-live-0123456789abcdefSECRET"
    etl.fake.echo_key = True
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = NULL")
    result = etl.run("--log-format", "json", OPENAI_API_KEY=secret, **env_for_table(**DIMS))
    *_, line = [json.loads(line) for line in result.stderr.splitlines()]
    assert result.returncode == 1 and line["level"] == "ERROR" and "SECRET" not in result.stderr
    assert line["message"].startswith("the API refused the key (401: Incorrect API key provided: ***)")
