"""What `serve` keeps filled, as the database says: every column with a confirmed record in
etl_columns (model, dimensions, provider host, text columns, id column: written by its first run's
vectors or by `init --track-changes`) whose change-tracking trigger is installed and enabled.

Credentials stay out of the database: a record names its provider's host only, and the host is
matched to a provider configured in config.env or the environment (its key, URL, deployment). A
column whose host no configured provider has is left alone, with the reason: never filled with
another model, or through another server."""

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg2
from psycopg2.extras import RealDictCursor

from . import catalog, db, guard, logs
from .errors import EtlError
from .providers import PROVIDERS, make_provider

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .catalog import Target
    from .passes import Run
    from .settings import Settings


@dataclass(frozen=True)
class Kept:
    """One tracked column: the settings that fill it, or why it is left alone."""

    name: str  # schema.table.column
    settings: "Settings | None" = None
    target: "Target | None" = None
    why: str | None = None
    busy: bool = False  # its table did not answer in time (locked): as it was


def providers_by_host(base: "Settings") -> dict[str, str]:
    """The host of each provider whose settings are complete (its key, its URL), to the provider's name;
    ETL_PROVIDER's first when two are at one host."""
    hosts: dict[str, str] = {}
    for name in dict.fromkeys([base.provider, *PROVIDERS]):
        provider = make_provider(dataclasses.replace(base, provider=name))
        try:
            provider.check()
        except EtlError:
            continue
        hosts.setdefault(provider.host, name)
    return hosts


def provider_for(recorded: str, hosts: dict[str, str]) -> str | None:
    """The configured provider (of `providers_by_host`) at the host a record names; a host recorded
    without its port (records made before they kept it) is any configured port of that host."""
    return hosts.get(recorded) or next(
        (name for host, name in hosts.items() if urlsplit(f"//{host}").hostname == recorded), None
    )


def discover(conn: db.Connection, base: "Settings") -> list[Kept]:
    """Every tracked column, with the settings that fill it or why it is left alone (autocommit `conn`)."""
    hosts = providers_by_host(base)
    with conn.cursor(cursor_factory=RealDictCursor) as cur:
        cur.execute(db.load_sql("serve/tracked_columns"))
        records = [dict(row) for row in cur.fetchall()]
    found = []
    for record in records:
        kept = _column(conn, base, record, hosts)
        if kept is not None:
            found.append(kept)
    return found


def _column(conn: db.Connection, base: "Settings", record: dict[str, Any], hosts: dict[str, str]) -> Kept | None:
    """The column of one record (None when it is not tracked)."""
    name = f"{record['table_name']}.{record['column_name']}"
    parts = catalog.split_table_name(record["table_name"])
    try:
        id_column = record["id_column"] or catalog.scalar(
            conn, db.load_sql("serve/primary_key"), {"relation": catalog.relation_literal(conn, parts)}
        )
        settings = dataclasses.replace(
            base,
            table=record["table_name"],
            id_column=id_column or base.id_column,
            text_columns=tuple(record["recipe"]),
            embedding_column=record["column_name"],
            model=record["model"],
            dimensions=None,
            extra_body=None,
            provider=provider_for(record["provider"], hosts) or base.provider,
        )
        target = catalog.inspect_target(conn, settings)
        relation = catalog.relation_literal(conn, target.name_parts)
        trigger = catalog.tracking_name(target)[1]
        if not catalog.scalar(conn, db.load_sql("sync/tracking_status"), {"relation": relation, "trigger": trigger}):
            return None
    except psycopg2.errors.QueryCanceled:  # a lock held on the table (VACUUM FULL, a migration): busy, not gone
        return Kept(name, busy=True)
    except (psycopg2.Error, EtlError) as error:
        return Kept(name, why=db.first_line(error))
    if provider_for(record["provider"], hosts) is None:
        return Kept(
            name,
            why=f"no provider is configured for {record['provider']}, which filled it (set its URL and key in "
            "config.env or the environment: OPENAI_BASE_URL and OPENAI_API_KEY, or AZURE_OPENAI_*)",
        )
    extra_body = _extra_body(base, record["extra_body"])
    if extra_body is None:
        return Kept(name, why="its vectors were asked with a secret field that EMBEDDING_EXTRA_BODY does not give")
    settings = dataclasses.replace(settings, extra_body=extra_body or None)
    native = make_provider(settings, target.dimensions).output_dimensions
    if record["dimensions"] and record["dimensions"] != native:
        settings = dataclasses.replace(settings, dimensions=record["dimensions"])  # it was asked for them
    return Kept(name, settings, target)


def _extra_body(base: "Settings", recorded: str) -> str | None:
    """The request fields the column's vectors were asked with ('' none), or None when the record keeps
    a secret's hash only and EMBEDDING_EXTRA_BODY is not the same fields."""
    if not recorded:
        return ""
    if guard.recorded_extra_body(base.extra_body) == recorded:
        return base.extra_body
    if any(str(value).startswith("sha256:") for value in json.loads(recorded).values()):
        return None
    return recorded


class Column:
    """One kept column: its settings, its Run (passes of the pool), what the loop knows of its backlog."""

    def __init__(self, kept: Kept, run: "Run", processes: int, before: dict[str, int] | None = None) -> None:
        assert kept.settings is not None and kept.target is not None
        self.name, self.settings, self.target, self.run = kept.name, kept.settings, kept.target, run
        self.channel = catalog.tracking_name(kept.target)[1]
        self.before = before or {}  # the totals of this column's earlier Runs in this process (/metrics)
        self.dirty = True  # rows may wait: look
        self.slice = processes * kept.settings.batch_size * 2  # the first pass is short: its rate sets the next
        self.parked_until = 0.0
        self.park = 0.0  # the last wait after a failed pass: doubled by the next, until a pass takes rows
        self.failure: str | None = None  # what the last failed pass said (said once)
        self.cut = False  # its pass was stopped: no request succeeded for CUT_SECONDS while others wait
        self.waiting: int | None = None  # rows NULL at the last count
        self.waiting_since: float | None = None  # since when rows wait (the last time none did, as seen here)
        self.said: dict[str, int] = {}
        self.said_at = 0.0

    def totals(self) -> dict[str, int]:
        """What this process did for the column, its earlier Runs included."""
        return {name: value + self.before.get(name, 0) for name, value in self.run.totals().items()}

    def counted(self, waiting: int) -> None:
        self.waiting = waiting
        if not waiting:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def cut_if_stuck(self, seconds: float) -> None:
        """Stop the pass under way when its server fails (requests failed, not for 429s, and none succeeded
        for `seconds`): the other columns wait while it does."""
        shared = self.run.shared
        if shared is None or shared.stopping():
            return
        totals = shared.totals()
        if totals["retries"] > totals["rate_limited"] and time.monotonic() - self.run.limiter["last_success"] > seconds:
            self.cut = True
            shared.request_stop()

    def failed(self, why: str, first: float, most: float) -> None:
        """A pass that stopped on `why`: wait `first` s, then twice as long after each failure, up to
        `most`; said once (again at DEBUG)."""
        self.park = min(most, self.park * 2 or first)
        self.parked_until = time.monotonic() + self.park
        with logs.column(self.name):
            level = logging.DEBUG if why == self.failure else logging.WARNING
            log.log(level, "column %s: %s; its next turn in %.0f s", self.name, why, self.park)
        self.failure = why

    def took(self, totals: dict[str, int], every: float) -> None:
        """A pass that took rows: the failures are over; a line of totals, every `every` s at most."""
        self.park, self.failure = 0.0, None
        if self.said and time.monotonic() - self.said_at < every:
            return
        self.said_at, self.said = time.monotonic(), totals
        with logs.column(self.name):
            log.info(
                "column %s embedded=%d failed=%d tokens=%d requests=%d rate_limited=%d",
                self.name,
                *(totals[name] for name in ("embedded", "failed", "tokens", "requests", "rate_limited")),
            )
