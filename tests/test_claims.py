"""Never in the application's way: no row lock and no open transaction while a request is out, a
write that lands only on the text that was sent, and claims that die with their run's lease."""

import os
import signal
import time

import psycopg2
import pytest
from psycopg2 import sql

from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import expected_vector

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def stored(db, row_id):
    with db.cursor() as cur:
        cur.execute("SELECT embedding::text FROM foods WHERE id = %s", (row_id,))
        text = cur.fetchone()[0]
    return None if text is None else [float(x) for x in text.strip("[]").split(",")]


def tool_sessions_in_transaction(db):
    """The tool's sessions idle in a transaction for over 200 ms: one held across a request (of 2 s
    here), not a claim caught between its statements (a few ms, on a loaded machine)."""
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'embedfill:%%' "
            "AND state LIKE 'idle in transaction%%' AND now() - state_change > interval '200 milliseconds'"
        )
        return cur.fetchone()[0]


@pytest.mark.parametrize("tracking", [False, True])
def test_the_application_never_waits_on_a_request_and_its_edit_is_never_overwritten(etl, db, tracking):
    make_foods(db, 30)
    if tracking:
        assert etl.run("init", "--track-changes", **env_for_table()).returncode == 0
    etl.fake.latency = 2.0
    run = etl.start("--workers", "1", "--batch-size", "10", **env_for_table(**DIMS))
    assert wait_for(lambda: etl.fake.in_flight > 0)  # the first batch (ids 1..10) is out, for 2 s
    time.sleep(0.4)
    assert tool_sessions_in_transaction(db) == 0
    app = psycopg2.connect(etl.database_url)
    with app.cursor() as cur:
        cur.execute("SET lock_timeout = '200ms'")
        started = time.monotonic()
        cur.execute("UPDATE foods SET name = 'edited while its request was out' WHERE id = 3")
    app.commit()
    app.close()
    assert time.monotonic() - started < 0.5  # it never waited on the request
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    embedded, null = check_table(db)  # every vector is its row's text now, row 3 included
    assert null == [] and len(embedded) == 30
    assert stored(db, 3) == pytest.approx(
        expected_vector("edited while its request was out\ncategory 2\ndescription of 3", 8).tolist(), abs=1e-6
    )
    assert "summary embedded=30 " in out  # row 3's first vector was never written: the sweep embedded its new text


def test_idle_in_transaction_timeout_cannot_stop_a_run(etl, db):
    """A server that kills sessions idle in a transaction for 1 s, with 2 s answers: nothing is open."""
    make_foods(db, 40)
    with db.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = '1s'").format(
                sql.Identifier(db.info.dbname)
            )
        )
    etl.fake.latency = 2.0
    result = etl.run("--workers", "2", "--batch-size", "10", timeout=60, **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 40
    assert etl.fake.inputs == 40  # every row paid for once
    assert "lost the database connection" not in result.stderr


def test_a_hung_runs_rows_go_to_the_next_run_once_its_lease_runs_out(etl, db):
    """A host that stops answering with its sockets open (SIGSTOP of the whole run: no FIN, no RST):
    its claims die with its lease, and another run finishes the table."""
    from embedfill.lease import LEASE_SECONDS

    make_foods(db, 100)
    etl.fake.latency = 30.0
    hung = etl.start("--workers", "1", "--batch-size", "50", **env_for_table(**DIMS))
    try:
        assert wait_for(lambda: etl.fake.in_flight > 0)
        os.killpg(hung.pid, signal.SIGSTOP)
        time.sleep(LEASE_SECONDS + 1)
        etl.fake.latency = 0
        result = etl.run("--workers", "2", "--batch-size", "50", **env_for_table(**DIMS))
        assert result.returncode == 0, result.stderr
        embedded, null = check_table(db)
        assert null == [] and len(embedded) == 100
        assert "still_null=0" in result.stdout
    finally:
        os.killpg(hung.pid, signal.SIGKILL)
        hung.communicate(timeout=30)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl_claims c JOIN etl_runs r USING (run_id) WHERE r.lease_until > now()")
        assert cur.fetchone()[0] == 0


def test_two_runs_at_once_pay_for_each_row_once(etl, db):
    make_foods(db, 2000)
    etl.fake.latency = 0.05
    runs = [etl.start("--workers", "3", "--batch-size", "20", **env_for_table(**DIMS)) for _ in range(2)]
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert [code for code, _, _ in results] == [0, 0], results
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 2000
    total = sum(int(out.split("embedded=")[1].split()[0]) for _, out, _ in results)
    assert total == 2000  # each row written by exactly one of them
    assert etl.fake.inputs <= 2000 * 1.02  # and paid for (almost) once
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl_claims")
        assert cur.fetchone()[0] == 0  # both released what they claimed


def test_the_lease_is_renewed_every_two_seconds_without_waiting(database_url, db):
    """The parent's loop drives the renewal a step at a time: no step waits on the database, and the
    lease is written once per RENEW_SECONDS, not at every tick."""
    import multiprocessing

    from embedfill import db as store
    from embedfill import schema
    from embedfill.lease import RENEW_SECONDS, Lease
    from embedfill.ratelimit import RateLimiter
    from embedfill.settings import resolve

    conn = store.connect(database_url)
    schema.ensure(conn)
    conn.close()

    lease = Lease(
        resolve({"database_url": database_url}, {}, {}), "public.foods", RateLimiter(multiprocessing.get_context())
    )
    lease.renew()
    seen, slowest, started = set(), 0.0, time.monotonic()
    while time.monotonic() - started < 2.5 * RENEW_SECONDS:
        tick = time.monotonic()
        lease.tick()
        slowest = max(slowest, time.monotonic() - tick)
        with db.cursor() as cur:
            cur.execute("SELECT lease_until FROM etl_runs WHERE run_id = %s", (lease.run_id,))
            seen.add(cur.fetchone()[0])
        time.sleep(0.02)
    lease.release()
    assert 2 <= len(seen) <= 3  # the first renewal, then one every RENEW_SECONDS
    assert slowest < 0.1
