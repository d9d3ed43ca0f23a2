"""Database access on the hot path: connections, the named SQL files, claims and writes.

Catalog inspection, counts and advice live in catalog.py."""

import functools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extras

from . import logs
from .errors import DatabaseError

log = logging.getLogger(__name__)

# psycopg2 ships no type information: its connections and cursors are Any to mypy.
Connection = Any
Cursor = Any

# sql/ at the top of a checkout; inside the package (embedfill/sql) when installed from a build,
# which ships the same files there (pyproject.toml).
_PACKAGE = Path(__file__).resolve().parent
SQL_DIR = next((d for d in (_PACKAGE / "sql", _PACKAGE.parent / "sql") if d.is_dir()), _PACKAGE.parent / "sql")
APPLICATION_PREFIX = "embedfill"
COPY_CHUNK_BYTES = 1 << 20  # the COPY is sent in pieces of about this size, never built whole
# Serialization failure, deadlock, lock timeout, statement timeout: roll back and try again.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})

SESSION_OPTIONS = r"-c default_transaction_isolation=read\ committed"
# A dead connection is noticed in about half a minute, not after TCP's two hours: keepalive probes
# after 10 s of silence, and a send that is not acknowledged within 30 s aborts (libpq parameters;
# the ones DATABASE_URL sets itself win).
TCP_SETTINGS = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


@functools.cache
def load_sql(name: str) -> str:
    """The text of sql/<name>.sql."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def describe_url(url: str | None) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.scheme in ("postgres", "postgresql"):
            return f"{parts.hostname or 'local socket'}{':' + str(parts.port) if parts.port else ''}{parts.path}"
    except ValueError:  # a port out of range
        pass
    return "the configured database"


def first_line(error: BaseException) -> str:
    """The first line of an error's text, without secrets (libpq may echo a password)."""
    text = str(error).strip() or type(error).__name__
    return logs.redact(text.splitlines()[0].strip())


def connect(
    url: str | None, application_name: str = APPLICATION_PREFIX, timeout: float = 10, **options: Any
) -> Connection:
    """A psycopg2 connection speaking UTF-8 whatever the database's encoding (ids and texts
    round-trip exactly), with TCP keepalives, in READ COMMITTED whatever the database's default
    (a claim must see the claims made while it waited for its lock: claim/claim_lock.sql), or a
    one-line DatabaseError naming the server and the cause. `timeout`: seconds to wait for the
    server (a reconnect passes what is left of its window)."""
    try:
        given = psycopg2.extensions.parse_dsn(url)
    except psycopg2.Error as error:
        raise DatabaseError(f"DATABASE_URL is not a valid connection URL: {first_line(error)}") from None
    tcp = {key: value for key, value in TCP_SETTINGS.items() if key not in given}
    server = f"{given.get('options', '')} {SESSION_OPTIONS}".strip()  # the URL's own options kept
    try:
        return psycopg2.connect(
            url,
            application_name=application_name[:63],
            connect_timeout=max(2, round(timeout)),
            client_encoding="UTF8",
            options=server,
            **tcp,
            **options,
        )
    except psycopg2.Error as error:
        raise DatabaseError(
            f"cannot connect to the database at {describe_url(url)}: {first_line(error)} (check DATABASE_URL)"
        ) from error


# What to do about the errors a user can act on, by SQLSTATE.
ADVICE: dict[str | None, str] = {
    "25006": "the database is read-only (a standby, or default_transaction_read_only is on): "
    "point DATABASE_URL at the primary",
    "53300": "the server has no connection left (max_connections): lower --workers, or free connections",
    "53400": "the server has no connection left (max_connections): lower --workers, or free connections",
    "42501": "the tool's role lacks a privilege on the table or the etl_* tables: grant it, or use another role",
    "57P01": "the server was shut down or the connection terminated by an administrator",
}


def explain(error: BaseException) -> str:
    """A database error in one line, with what to do when the tool knows (read-only server, no
    connection left, a missing privilege)."""
    text = first_line(error)
    advice = ADVICE.get(getattr(error, "pgcode", None))
    return f"{text} ({advice})" if advice else text


def password(url: str) -> str | None:
    """The password in a connection URL or string, if any (so that no message shows it)."""
    try:
        return psycopg2.extensions.parse_dsn(url).get("password")
    except psycopg2.Error:
        try:
            return urlsplit(url).password
        except ValueError:
            return None


class ChunkReader:
    """A file for COPY to read, over an iterator of byte chunks: nothing is built whole."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(chunks)

    def read(self, size: int = -1) -> bytes:
        return next(self.chunks, b"")
