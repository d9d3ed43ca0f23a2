"""The model guard: what a column holds (etl_columns: model, dimensions, provider host, text
recipe, the extra request fields), refused before any request when a run would add vectors of another kind, and recorded
by the first write of vectors (a run that writes nothing leaves no record)."""

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg2
from psycopg2.extras import RealDictCursor

from . import db, schema
from .catalog import Target, relation_literal, scalar
from .db import load_sql
from .errors import ConfigError
from .options import extra_body_secrets
from .providers import make_provider

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

RESET_LOCK_KEY = 0x656D6272  # "embr", with the table's hash: held by init --reset-column while it clears


def column_identity(settings: "Settings", target: Target) -> dict[str, Any]:
    """What this run writes into the column: model, dimensions, provider (the provider's host,
    never the key), recipe (the text columns, in order) and extra_body (EMBEDDING_EXTRA_BODY, '': none)."""
    provider = make_provider(settings, target.dimensions)
    return {
        "model": provider.model_name,
        "dimensions": settings.dimensions or target.dimensions or provider.output_dimensions,
        "provider": provider.host,
        "recipe": list(target.text_columns),
        "extra_body": recorded_extra_body(settings.extra_body),
    }


def recorded_extra_body(extra_body: str | None) -> str:
    """EMBEDDING_EXTRA_BODY as the column's record keeps it: a secret field's value by its hash only."""
    secrets = extra_body_secrets(extra_body)
    fields = {
        key: f"sha256:{hashlib.sha256(str(value).encode()).hexdigest()[:16]}" if str(value) in secrets else value
        for key, value in json.loads(extra_body or "{}").items()
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False) if fields else ""


def column_record(conn: db.Connection, target: Target) -> dict[str, Any] | None:
    """What etl_columns says the column holds (column_identity's keys, origin_unknown, recorded,
    claimed_by), or None. A record not yet confirmed by a write counts while the run that made
    it is alive (its lease): a run that died before writing a vector left no record."""
    if schema.version(conn) < schema.VERSION:  # a read-only verb on tables no run has migrated yet
        conn.rollback()
        return None
    with conn.cursor(cursor_factory=RealDictCursor) as cur:
        cur.execute(load_sql("guard/column_record"), _column_key(target))
        row = cur.fetchone()
    conn.rollback()
    return dict(row) if row and row["live"] else None


def record_column(
    cur: db.Cursor,
    target: Target,
    identity: Mapping[str, Any],
    origin_unknown: bool = False,
    claimed_by: str | None = None,
) -> bool:
    """Make the column's record (held by run `claimed_by` until its first write confirms it, or
    confirmed at once); True if this one is the record now, False if another was there first."""
    params = {**_column_key(target), **identity, "origin_unknown": origin_unknown, "claimed_by": claimed_by}
    params["id_column"] = target.id_column  # for `serve`, which knows the column by its record alone
    cur.execute(load_sql("guard/record_column"), params)
    return cur.fetchone() is not None


def _has_vectors(conn: db.Connection, target: Target) -> bool:
    """Whether the column already holds vectors: statistics that saw one say yes at once; else a
    search of at most 5 s (a big table still all NULL is not read to its end: then, no)."""
    params = {"relation": relation_literal(conn, target.name_parts), "column": target.embedding_column}
    if scalar(conn, load_sql("guard/stats_say_vectors"), params):
        return True
    try:
        with conn.cursor() as cur:
            cur.execute(target.query("guard/has_vectors"))
            return cur.fetchone()[0]
    except psycopg2.errors.QueryCanceled:
        log.info("%s.%s: no vector found within 5 s; taken as empty", target.display, target.embedding_column)
        return False
    finally:
        conn.rollback()


def guard_column(
    conn: db.Connection, settings: "Settings", target: Target, run_id: str | None = None
) -> dict[str, Any]:
    """Refuse, before any request, a run that would add vectors of another model, dimension
    count, provider or recipe to the column. A run that writes (`run_id`, whose lease is live)
    and finds no record makes one, held for it until its first vectors confirm it (db.WorkerStore):
    a run that writes nothing leaves no record.

    Vectors of two models in one column are not comparable: search would be quietly wrong."""
    wanted = column_identity(settings, target)
    reset = {"lock_key": RESET_LOCK_KEY, "table_name": target.qualified_name}
    if run_id is not None and not scalar(conn, load_sql("guard/reset_lock_shared"), reset):
        raise ConfigError(
            f"init --reset-column is clearing {target.display}.{target.embedding_column} now: run again once it ends"
        )
    held = column_record(conn, target)
    if held is None and run_id is not None:
        adopted = _has_vectors(conn, target)
        with conn.cursor() as cur:
            won = record_column(cur, target, wanted, adopted, claimed_by=run_id)
        conn.commit()
        if won and adopted:
            log.warning(
                "%s.%s already held vectors when this tool first saw it: recorded as %s, but their origin is "
                "unknown (`python etl.py verify` checks them)",
                target.display,
                target.embedding_column,
                describe_identity(wanted),
            )
        held = column_record(conn, target)  # two runs starting together: the first row in is the record
    different = [] if held is None else differing(held, wanted)
    if held is not None and different:
        raise ConfigError(
            f"{target.display}.{target.embedding_column} holds {describe_identity(held, different)}; this run would "
            f"add {describe_identity(wanted, different, 'ones')}. Fill a new column (--embedding-column embedding_v2, "
            "created by init --dimensions N) or clear this one first (init --reset-column --yes)"
        )
    return wanted


def keep_column(conn: db.Connection, settings: "Settings", target: Target) -> str:
    """`init --track-changes`: record what the column keeps (the user saying so: `serve` fills it by this
    record), confirmed at once, unless a record is there; refuse one that says otherwise. Returns a line."""
    wanted = column_identity(settings, target)
    held = column_record(conn, target)
    if held is None:
        with conn.cursor() as cur:
            record_column(cur, target, wanted, _has_vectors(conn, target))
        conn.commit()
        held = column_record(conn, target) or wanted
    different = differing(held, wanted)
    if different:
        raise ConfigError(
            f"{target.display}.{target.embedding_column} holds {describe_identity(held, different)}, not "
            f"{describe_identity(wanted, different, 'ones')}: set the settings it was filled with, or clear it first "
            "(init --reset-column --yes)"
        )
    return f"column {target.display}.{target.embedding_column} keeps {describe_identity(held)} (`serve` fills it)"


def differing(held: Mapping[str, Any], wanted: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    """The keys (of `wanted`) whose values the record `held` does not have. A provider recorded by its
    host alone (records made before they kept the port, or at the scheme's own port) is that host at
    any port."""

    def same(key: str) -> bool:
        return held[key] == wanted[key] or (key == "provider" and held[key] == urlsplit(f"//{wanted[key]}").hostname)

    return [key for key in (keys or list(wanted)) if not same(key)]


def describe_identity(identity: Mapping[str, Any], keys: Sequence[str] | None = None, noun: str = "vectors") -> str:
    """'text-embedding-3-small vectors of 1536 dimensions from api.openai.com (text: name,category)':
    the `keys` that differ, or (None) all, the extra request fields only when there are some."""
    if keys is None:
        keys = ("dimensions", "provider", "recipe") + (("extra_body",) if identity.get("extra_body") else ())
    parts = [identity["model"], noun]
    if "dimensions" in keys:
        parts.append(f"of {identity['dimensions'] or 'the default number of'} dimensions")
    if "provider" in keys:
        parts.append(f"from {identity['provider']}")
    if "recipe" in keys:
        parts.append(f"(text: {','.join(identity['recipe'])})")
    if "extra_body" in keys:
        parts.append(f"asked with {identity['extra_body'] or 'no extra fields'}")
    return " ".join(parts)


def describe_column(conn: db.Connection, target: Target) -> str:
    """One line for `status`: what the column holds, by the record of its first write."""
    held = column_record(conn, target)
    name = f"{target.display}.{target.embedding_column}"
    if held is None:
        return f"column {name}: no record yet (the next run records its model, provider and text columns)"
    if held["claimed_by"]:
        return f"column {name}: run {held['claimed_by']} is filling it with {describe_identity(held)} (not yet written)"
    unknown = "; vectors already there then: origin unknown" if held["origin_unknown"] else ""
    return f"column {name} holds {describe_identity(held)} (recorded {held['recorded']}{unknown})"


def _column_key(target: Target) -> dict[str, str]:
    return {"table_name": target.qualified_name, "column_name": target.embedding_column}
