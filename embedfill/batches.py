"""`etl.py --batch-api` and `etl.py batches cancel`: the verbs of OpenAI's Batch API, and the
lines `status` shows of the pending batches (batchapi.py submits, landing.py lands)."""

import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, TextIO, cast

from . import catalog, db, guard, schema
from .batchapi import ENDED, BatchRun, Record, api
from .errors import EXIT_OK, EXIT_PARTIAL, ConfigError, Stop
from .landing import Landing
from .progress import summary_line
from .providers import make_provider

if TYPE_CHECKING:
    from .catalog import Target
    from .settings import Settings

log = logging.getLogger(__name__)


def _open(settings: "Settings") -> BatchRun:
    provider = make_provider(settings)
    if provider.batch_endpoint is None:
        raise ConfigError("--batch-api needs the OpenAI API: set ETL_PROVIDER=openai")
    provider.check()
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        guard.guard_column(conn, settings, target)  # the record is made with the first batch (submit_new)
        return BatchRun(settings, conn, target)
    except BaseException:
        conn.close()
        raise


def run_batches(settings: "Settings", out: TextIO | None = None) -> int:
    """`python etl.py --batch-api`: land, submit, then wait and land (unless --no-wait); the exit code."""
    out = out or sys.stdout
    started = time.monotonic()
    stopped = None
    previous = {sig: signal.signal(sig, Stop.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    run = landing = None
    try:
        run = _open(settings)
        landing = Landing(run)
        run.resume()
        landing.poll()
        run.submit_new()
        if not settings.no_wait:
            landing.wait()
    except Stop as stop:
        stopped = stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run is not None:
            run.close()
            run.conn.close()
    if run is None:  # a signal before the database answered
        return cast(Stop, stopped).exit_code  # _open was stopped
    print(summary_line(settings, run.totals, time.monotonic() - started, 0), file=out, flush=True)
    log.info("batches submitted=%d ended=%d", run.submitted, cast(Landing, landing).landed)
    if stopped is not None:
        log.warning(
            "interrupted by %s: the batches keep running at OpenAI; rerun the same command to land them",
            signal.Signals(cast(int, stopped.signum)).name,  # a signal's Stop: nothing else stops it
        )
        return stopped.exit_code
    if settings.no_wait and run.submitted:
        log.info("%d batches submitted; rerun the same command (or without --no-wait) to land them", run.submitted)
    if run.totals["failed"]:
        log.warning(
            "%d rows could not be embedded; each is recorded in etl_failures "
            "(`python etl.py status` shows why; rerun with --retry-failed to try them again)",
            run.totals["failed"],
        )
        return EXIT_PARTIAL
    return EXIT_OK


def cancel_batches(settings: "Settings", out: TextIO) -> int:
    """`python etl.py batches cancel`: cancel this table's pending batches and release their rows."""
    run = _open(settings)
    try:
        run.resume(create=False)  # a batch created just before a kill is cancelled too
        pending = run.pending()
        for record in pending:
            if record.batch_id is None:  # never created: nothing runs at OpenAI
                run.release(record.key)
                run.update(record.key, state="cancelled")
                print(f"cancelled {record.key} (never created) rows={record.rows}", file=out)
                continue
            with api(f"cancelling batch {record.batch_id}"):
                batch = run.client.batches.retrieve(record.batch_id)
                if batch.status == "completed":
                    print(
                        f"batch {record.key} {batch.id} completed: not cancelled (rerun --batch-api to land it)",
                        file=out,
                    )
                    continue
                if batch.status not in ENDED:
                    batch = run.client.batches.cancel(record.batch_id)
            run.release(record.key)
            run.update(record.key, state="cancelled")
            print(f"cancelled {record.key} {batch.id} was {batch.status} rows={record.rows}", file=out)
        if not pending:
            print(f"no pending batches for {run.target.display}", file=out)
    finally:
        run.close()
        run.conn.close()
    return EXIT_OK


def status_lines(conn: db.Connection, target: "Target") -> list[str]:
    """One line per pending batch of the table, from PostgreSQL alone (no API call)."""
    if not catalog.tool_table_exists(conn, "etl_batches"):
        return []
    with conn.cursor() as cur:
        cur.execute(db.load_sql("batch/batch_pending"), {"table_name": target.qualified_name})
        records = [Record(*row) for row in cur.fetchall()]
    conn.rollback()
    return [
        f"batch {r.key} id={r.batch_id or '-'} state={r.state} age={r.age} rows={r.rows} "
        f"request_counts={r.counts or '-'} attempt={r.attempts}"
        for r in records
    ]
