"""`etl.py status`: where the table stands (rows, failures, runs and their shares, tracking, what
the column holds, deferred indexes, pending batches), as text or JSON, from PostgreSQL alone."""

import json
import logging
from typing import TYPE_CHECKING, TextIO

import psycopg2
from psycopg2 import sql

from . import catalog, db, guard, indexes, logs
from .errors import EXIT_OK, DatabaseError
from .tracked import provider_for, providers_by_host

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)


def show_status(settings: "Settings", out: TextIO, top: int = 5, as_json: bool = False) -> int:
    """Rows total (estimate), rows still NULL, failures and their reasons, active runs; as text or JSON."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        estimate = catalog.estimate_rows(conn, target)
        null_rows = catalog.count_null(conn, target)
        with conn.cursor() as cur:
            has_ledger, has_runs, has_deferred = (
                catalog.tool_table_exists(conn, name) for name in ("etl_failures", "etl_runs", "etl_deferred_indexes")
            )
            reasons, failed, leases = [], 0, []
            if has_ledger:
                cur.execute(db.load_sql("status/ledger_count"), {"table_name": target.qualified_name})
                failed = cur.fetchone()[0]
                cur.execute(db.load_sql("status/status_failures"), {"table_name": target.qualified_name, "top": top})
                reasons = cur.fetchall()
            if has_runs:
                cur.execute(db.load_sql("status/status_runs"), {"table_name": target.qualified_name})
                leases = cur.fetchall()
            waiting = indexes.deferred(conn, target) if has_deferred else []
            pattern = f"{db.APPLICATION_PREFIX}:{target.qualified_name}:%"
            cur.execute(db.load_sql("status/status_active"), {"pattern": pattern[:63]})
            runs, processes = cur.fetchone()
            relation = catalog.relation_literal(conn, target.name_parts)
            cur.execute(
                db.load_sql("sync/tracking_status"), {"relation": relation, "trigger": catalog.tracking_name(target)[1]}
            )
            tracking = "on" if cur.fetchone()[0] else "off"
            oldest = None
            if settings.updated_column:
                try:
                    cur.execute(target.query("status/oldest_null", updated=sql.Identifier(settings.updated_column)))
                except psycopg2.Error as error:
                    raise DatabaseError(
                        f"cannot read {target.display}.{settings.updated_column}: {db.first_line(error)} "
                        "(check ETL_UPDATED_COLUMN)"
                    ) from error
                oldest = cur.fetchone()[0]
                tracking += f" oldest_null_age={(oldest or 'none').replace(' ', '_')}"
        conn.rollback()
        holds, record = guard.describe_column(conn, target), guard.column_record(conn, target)
        serve = None  # what `serve` does with the column: only a tracked column with a record is its
        if tracking.startswith("on") and record is not None and not record["claimed_by"]:
            host = record["provider"]
            serve = (
                "fills it"
                if provider_for(host, providers_by_host(settings))
                else f"leaves it alone: no provider is configured for {host} (set its URL and key)"
            )
        from .batches import status_lines  # imported here: batches pulls in the driver, which status needs not

        batches = status_lines(conn, target)
    finally:
        conn.close()
    if as_json:
        document = {
            "table": target.display,
            "column": target.embedding_column,
            "rows_total_estimate": estimate if estimate >= 0 else None,
            "rows_null": null_rows,
            "rows_failed": failed,
            "active_runs": runs,
            "active_processes": processes,
            "run_active": bool(runs),
            "tracking": tracking.startswith("on"),
            "oldest_null_age": oldest,
            "holds": record,
            "serve": serve,
            "runs": [
                {"run": run_id, "share": f"1/{count}", "tpm": tpm, "rpm": rpm, "running_for": age}
                for run_id, tpm, rpm, count, age in leases
            ],
            "deferred_indexes": [{"index": name, "dropped_ago": age} for _, name, _, age in waiting],
            "failures": [{"reason": logs.redact(reason), "rows": count} for reason, count in reasons],
            "batches": batches,
        }
        print(json.dumps(document, ensure_ascii=False, default=str), file=out)
        return EXIT_OK
    total = f"~{estimate}" if estimate >= 0 else "unknown"
    print(
        f"status table={target.display} rows_total_estimate={total} rows_null={null_rows} "
        f"rows_failed={failed} active_runs={runs} active_processes={processes} run_active={'yes' if runs else 'no'} "
        f"tracking={tracking}",
        file=out,
    )
    print(holds, file=out)
    if serve is not None:
        print(f"serve {serve}", file=out)
    for run_id, tpm, rpm, runs, age in leases:
        budgets = " ".join(f"{name}={value / runs:.0f}" for name, value in (("tpm", tpm), ("rpm", rpm)) if value)
        print(f"run {run_id} share=1/{runs} {budgets or 'no configured budget'} running_for={age}".rstrip(), file=out)
    for _, name, _, age in waiting:
        print(
            f"index {name} dropped by --defer-index {age} ago, waiting to be rebuilt at the end of a run "
            "(or now: python etl.py init --restore-index)",
            file=out,
        )
    for reason, count in reasons:
        print(f"failed {count:>8}  {logs.redact(reason)}", file=out)
    for line in batches:
        print(line, file=out)
    return EXIT_OK
