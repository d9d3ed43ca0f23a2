"""What must never happen to a user's data: a table the user did not name touched, a vector in
the wrong row, a row paid for again on every rerun; and the cursor that walks the ranges."""

import re

import psycopg2
import pytest
from psycopg2 import sql

from embedfill.worker import process_count
from tests.conftest import _with_database, check_table, env_for_table, make_foods
from tests.test_errors import one_line_error

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def ledger(db):
    with db.cursor() as cur:
        cur.execute("SELECT table_name, row_id, reason FROM etl_failures ORDER BY table_name, row_id")
        return cur.fetchall()


def test_the_demo_never_touches_a_users_foods_table(etl, db):
    make_foods(db, 20)
    with db.cursor() as cur:
        cur.execute(
            "CREATE TABLE etl_failures (table_name text, row_id text, reason text NOT NULL, "
            "attempts int NOT NULL DEFAULT 1, first_seen timestamptz NOT NULL DEFAULT now(), "
            "last_seen timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (table_name, row_id))"
        )
        cur.execute("INSERT INTO etl_failures (table_name, row_id, reason) VALUES ('public.foods', '3', 'empty text')")
    result = etl.run("demo", "--rows", "50", OPENAI_API_KEY=None, ETL_TABLE="foods")
    assert result.returncode == 0, result.stderr
    assert re.search(r"demo table embedfill_demo in database t_\w+ on \S+:\d+: 50 rows", result.stdout), result.stdout
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(embedding) FROM foods")
        assert cur.fetchone() == (20, 0)
        cur.execute("SELECT count(*) FROM embedfill_demo WHERE embedding IS NOT NULL")
        assert cur.fetchone()[0] == 50
    assert ledger(db) == [("public.foods", "3", "empty text")]

    again = etl.run("demo", "--rows", "30", OPENAI_API_KEY=None)  # the demo's own table is replaced
    assert again.returncode == 0, again.stderr
    with db.cursor() as cur:
        cur.execute("SELECT count(*), count(embedding) FROM embedfill_demo")
        assert cur.fetchone() == (30, 30)


def test_the_demo_refuses_to_replace_a_table_it_did_not_make(etl, db):
    with db.cursor() as cur:
        cur.execute("CREATE TABLE embedfill_demo (id int PRIMARY KEY, note text)")
        cur.execute("INSERT INTO embedfill_demo VALUES (1, 'mine')")
    result = etl.run("demo", "--rows", "50", OPENAI_API_KEY=None)
    assert result.returncode == 1
    assert re.fullmatch(
        r"error: table embedfill_demo in database t_\w+ on \S+:\d+ was not made by `etl.py demo`; "
        r"the demo does not replace it: rename or drop it yourself, or use another database",
        one_line_error(result),
    )
    with db.cursor() as cur:
        cur.execute("SELECT * FROM embedfill_demo")
        assert cur.fetchall() == [(1, "mine")]


@pytest.mark.parametrize(
    "index",
    [
        None,
        "CREATE UNIQUE INDEX ON foods (id) WHERE id > 10",
        "CREATE UNIQUE INDEX ON foods (id, name)",
        "CREATE INDEX ON foods (id)",
    ],
)
def test_an_id_column_that_is_not_unique_is_refused_before_any_request(etl, db, index):
    with db.cursor() as cur:
        cur.execute("CREATE TABLE foods (id bigint, name text, category text, description text, embedding vector(8))")
        cur.execute("INSERT INTO foods (id, name) VALUES (1, 'kimchi stew'), (1, 'caesar salad'), (2, 'pad thai')")
        if index:
            cur.execute(index)
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: column foods.id is not known to be unique: it needs a primary key or a unique index on it alone, "
        "or one row's vector could land in every row sharing its id (add one, or set ETL_ID_COLUMN)"
    )
    assert etl.fake.requests == 0
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NOT NULL")
        assert cur.fetchone()[0] == 0


def test_a_unique_index_on_the_id_alone_is_enough(etl, db):
    with db.cursor() as cur:
        cur.execute("CREATE TABLE foods (id bigint, name text, category text, description text, embedding vector(8))")
        cur.execute("INSERT INTO foods (id, name) SELECT g, 'food ' || g FROM generate_series(1, 50) g")
        cur.execute("CREATE UNIQUE INDEX ON foods (id)")
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 50


def test_text_ids_with_non_ascii_characters_in_a_latin1_database(etl, server_url):
    name = "t_latin1_" + re.sub(r"\W", "", etl.database_url.rsplit("/", 1)[1])[-10:]
    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
    url = _with_database(server_url, name)
    try:
        conn = psycopg2.connect(url, client_encoding="UTF8")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION vector")
        ids = ["café", "naïve", "plain", "Straße", "über"]
        texts = [(f"dish {row_id}", "crème brûlée", None) for row_id in ids]
        make_foods(conn, 0, id_type="text", ids=ids, texts=texts)
        result = etl.run(**env_for_table(**DIMS), DATABASE_URL=url)
        assert result.returncode == 0, result.stderr
        embedded, null = check_table(conn)
        assert null == [] and sorted(embedded) == sorted(ids)
        conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def test_a_row_the_write_could_not_fill_is_recorded_not_paid_for_again(etl, db):
    make_foods(db, 40)
    with db.cursor() as cur:  # a user's trigger that silently skips updates of one row
        cur.execute(
            "CREATE FUNCTION keep_seven() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.id = 7 THEN RETURN NULL; END IF; RETURN NEW; END $$"
        )
        cur.execute("CREATE TRIGGER keep_seven BEFORE UPDATE ON foods FOR EACH ROW EXECUTE FUNCTION keep_seven()")
    result = etl.run("--workers", "2", "--batch-size", "10", **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    assert "summary embedded=39 failed=1" in result.stdout
    embedded, null = check_table(db)
    assert null == ["7"] and len(embedded) == 39
    assert ledger(db) == [
        ("public.foods", "7", "the write skipped the row: a rule or a trigger on the table (one that returns NULL)")
    ]
    etl.fake.reset_counters()
    rerun = etl.run(**env_for_table(**DIMS))
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping 1 rows recorded in etl_failures" in rerun.stderr
    assert etl.fake.inputs == 0


def test_a_statement_timeout_rolls_the_batch_back_and_tries_it_again(etl, db):
    make_foods(db, 60)
    with db.cursor() as cur:  # the first write of the run outlasts statement_timeout, later ones do not
        cur.execute("CREATE SEQUENCE slow_once")
        cur.execute(
            "CREATE FUNCTION slow_once() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF nextval('slow_once') = 1 THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$"
        )
        cur.execute("CREATE TRIGGER slow_once BEFORE UPDATE ON foods FOR EACH ROW EXECUTE FUNCTION slow_once()")
        cur.execute(sql.SQL("ALTER DATABASE {} SET statement_timeout = '1s'").format(sql.Identifier(db.info.dbname)))
    result = etl.run("--workers", "1", "--batch-size", "10", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert "canceling statement due to statement timeout; the batch rolled back, trying it again" in result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 60


def test_one_worker_is_several_processes_with_one_request_in_flight(etl, db):
    make_foods(db, 200)
    etl.fake.latency = 0.05
    result = etl.run("--workers", "1", "--batch-size", "5", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 200
    assert etl.fake.max_in_flight == 1
    connections = len([span for span in etl.fake.spans if span[2] > 0])  # each process its own API connection
    assert 2 <= connections <= process_count(1)


def test_the_range_cursor_walks_every_id_once_and_again_after_a_rollback():
    from embedfill.planner import RangeCursor

    ids = list(range(1, 51))
    ranges = iter([(None, 10), (10, 30), (30, None)])
    cursor = RangeCursor(lambda: next(ranges, None))
    written, sizes, claims, batch_number = set(), [], 0, 0

    def claim(after, upto, limit):  # like sql/claim/claim_batch.sql: NULL rows of the segment, in id order
        return [i for i in ids if (after is None or i > after) and (upto is None or i <= upto) and i not in written][
            :limit
        ]

    while True:
        batch = []
        while len(batch) < 7:
            segment = cursor.segment()
            if segment is None:
                break
            wanted = 7 - len(batch)
            rows = claim(*segment, wanted)
            claims += 1
            batch += rows
            cursor.advance(rows[-1] if rows else None, len(rows) == wanted)
        if not batch:
            break
        batch_number += 1
        if batch_number == 2:  # this batch's write fails: its rows must be claimed again
            assert batch == [8, 9, 10, 11, 12, 13, 14]  # it drew from two ranges
            cursor.rollback()
            continue
        assert not written & set(batch)
        written |= set(batch)
        sizes.append(len(batch))
        cursor.commit()
    assert written == set(ids)
    assert sizes == [7] * 7 + [1]  # every batch full but the last


def test_a_segment_claimed_from_twice_in_one_batch_is_walked_again_once():
    """Under --limit a claim can be full but smaller than the batch: the same segment is claimed
    from again in the same batch, and a rollback must walk it again from its start, once."""
    from embedfill.planner import RangeCursor

    ranges = iter([(None, 10)])
    cursor = RangeCursor(lambda: next(ranges, None))
    assert cursor.segment() == (None, 10)
    cursor.advance(3, full=True)
    assert cursor.segment() == (3, 10)
    cursor.advance(5, full=True)
    cursor.rollback()
    assert cursor.segment() == (None, 10)
    assert cursor.claimed == [(None, 10)] and cursor.again == []
