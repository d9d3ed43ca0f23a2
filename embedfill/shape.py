"""What the tool learns of a server from its answers, once, says once, and keeps: the inputs and
tokens one request may carry, the tokens one input may have, whether it takes base64 and
`dimensions`, whether its `usage` is tokens.

A run's processes share one Shape in shared memory (a lesson one worker learns caps the others'
next requests at once); the parent loads it from etl_limits (per endpoint and model) before the
workers start and keeps what they learned at the end of each pass, so the next run starts right.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg2

from . import db, schema
from .db import load_sql
from .errors import EtlError

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from .providers.base import Provider

log = logging.getLogger(__name__)

_FIELDS = ("max_inputs", "max_tokens", "input_tokens", "floats", "no_dimensions", "own_usage", "said", "changed")


class Shape:
    """Created in the parent before the pool; inherited by every process of the run."""

    def __init__(self, context: BaseContext) -> None:
        self._lock = context.Lock()
        self._state = context.RawArray("d", len(_FIELDS))

    def __getitem__(self, name: str) -> float:
        return self._state[_FIELDS.index(name)]

    def __setitem__(self, name: str, value: float) -> None:
        self._state[_FIELDS.index(name)] = value

    def limit(self, name: str) -> int | None:
        """A learned limit (max_inputs, max_tokens, input_tokens), or None."""
        return int(self[name]) or None

    def lower(self, name: str, value: int) -> bool:
        """Learn that `name` is at most `value`; True if that lowered it (then the caller says so)."""
        with self._lock:
            if self[name] and self[name] <= value:
                return False
            self[name], self["changed"] = max(1, value), 1
            return True

    def set_flag(self, name: str) -> bool:
        """Learn a yes (floats, no_dimensions, own_usage); True the first time."""
        with self._lock:
            if self[name]:
                return False
            self[name], self["changed"] = 1, 1
            return True

    def follow(self, provider: Provider) -> None:
        """Make `provider` ask as learned (another process may have learned it): floats, no `dimensions`."""
        if self["floats"] and provider.encoding:
            provider.encoding = "float"
        if self["no_dimensions"]:
            provider.dimensions = None

    def say_once(self, bit: int) -> bool:
        with self._lock:
            if int(self["said"]) & bit:
                return False
            self["said"] = int(self["said"]) | bit
            return True

    # --- kept between runs ---------------------------------------------------------------------
    def load(self, conn: db.Connection, endpoint: str, model: str) -> None:
        """What earlier runs learned of this endpoint and model (etl_limits), said in one line (nothing
        on a database no run of this version has migrated: a read-only verb's)."""
        endpoint = where(endpoint)
        if schema.version(conn) < schema.VERSION:
            conn.rollback()
            return
        with conn.cursor() as cur:
            cur.execute(load_sql("shape/load_shape"), {"endpoint": endpoint, "model": model})
            row = cur.fetchone()
        conn.rollback()
        if row is None:
            return
        for name, value in zip(_FIELDS, row):
            self[name] = float(value or 0)
        known = ", ".join(f"{name}={self.limit(name)}" for name in _FIELDS[:3] if self[name])
        known += "".join(f", {name}" for name in _FIELDS[3:6] if self[name])
        log.info("what earlier runs learned of %s (%s): %s", endpoint, model, known.lstrip(", ") or "nothing")

    def keep(self, database_url: str | None, endpoint: str, model: str) -> None:
        """Keep what this run learned, if anything, for the next (one short connection; a failure to
        keep it is said, not the run's)."""
        if not self["changed"]:
            return
        values = {name: (int(self[name]) or None) if name in _FIELDS[:3] else bool(self[name]) for name in _FIELDS[:6]}
        endpoint = where(endpoint)
        try:
            conn = db.connect(database_url, timeout=3)
            try:
                with conn.cursor() as cur:
                    cur.execute(load_sql("shape/save_shape"), {"endpoint": endpoint, "model": model, **values})
                conn.commit()
            finally:
                conn.close()
            self["changed"] = 0
        except (psycopg2.Error, EtlError) as error:
            log.warning("could not keep what the run learned of the server: %s", db.first_line(error))


def where(endpoint: str) -> str:
    """The endpoint as etl_limits keys it: no user or password of the URL (never stored)."""
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
