"""The driver of a run: checks the table and the server, takes the lease, plans the ranges, runs
the passes (passes.py; then, with --follow, follow.py), reports, picks the exit code."""

import logging
import multiprocessing
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from . import catalog, db, guard, indexes, logs, planner, schema
from .errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGINT, EXIT_SIGTERM, EtlError
from .follow import Follower
from .lease import Lease, end_dead_runs
from .models import estimate_cost
from .passes import Run
from .progress import format_eta, summary_line
from .providers import check_provider, load_client_library, make_provider
from .ratelimit import RateLimiter
from .shape import Shape
from .texts import load_encoding, mean_tokens, row_text
from .worker import process_count

if TYPE_CHECKING:
    from .catalog import Target
    from .planner import Range
    from .settings import Settings

log = logging.getLogger(__name__)


def prepare(
    settings: "Settings", processes: int, limiter: RateLimiter, shape: Shape, lease: Lease | None = None
) -> tuple["Target", list["Range"], Lease | None, dict[str, Any]]:
    """Check the table and the server, migrate the tool's tables, take the run's lease (unless
    --dry-run, or `lease` is serve's, already taken), guard the column, read what earlier runs learned
    of the server (into `shape`) and plan the ranges (one short connection).
    Returns (target, ranges, lease or None, what the column's record must say)."""
    conn = db.connect(settings.database_url)
    own = lease is None
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        catalog.check_connections(conn, settings.workers, processes + 2)  # the workers, the lease, the count
        if not settings.dry_run and own:
            end_dead_runs(conn)
            lease = Lease(settings, target.qualified_name, limiter)
            lease.renew()  # live before the guard holds the column's record for it, and before any claim
        identity = guard.guard_column(conn, settings, target, run_id=None if lease is None else lease.run_id)
        provider = make_provider(settings, target.dimensions)
        shape.load(conn, provider.endpoint, provider.model)
        if own:  # serve neither drops nor rebuilds indexes: the application searches while it runs
            indexes.prepare(conn, target, settings, shape)
        if not catalog.has_partial_index(conn, target):
            statement, _ = catalog.partial_index_sql(target)
            log.warning(
                "no partial index on %s WHERE %s IS NULL: every claim scans more than it needs. "
                "Create it with: %s (or run `python etl.py init`)%s",
                target.display,
                target.embedding_column,
                statement,
                " (a partitioned table: this locks writes on it while it builds; or create it CONCURRENTLY on "
                "each partition)"
                if target.partitioned
                else "",
            )
        ranges = planner.plan_ranges(conn, target, processes, settings.batch_size)
    except BaseException:
        if lease is not None and own:
            lease.release()
        raise
    finally:
        conn.close()
    return target, ranges, lease, identity


class _Counts:
    """Rows to embed and known failures, counted in the background once the workers run."""

    def __init__(self, settings: "Settings", target: "Target") -> None:
        self.settings = settings
        self.target = target
        self.null_rows: int | None = None
        self.known_failures = 0
        self.announced = False
        self.ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._count, name="count", daemon=True).start()

    def _count(self) -> None:
        try:
            conn = db.connect(self.settings.database_url)
            try:
                self.null_rows = catalog.count_null(conn, self.target)
                if not self.settings.retry_failed:
                    self.known_failures = catalog.count_known_failures(conn, self.target)
            finally:
                conn.close()
        except Exception:  # the total only feeds the display
            log.debug("counting the rows to embed failed", exc_info=True)
        self.ready.set()

    def announce(self) -> None:
        """Say once that rows of the ledger are skipped."""
        if self.known_failures and not self.announced:
            self.announced = True
            log.info(
                "skipping %d rows recorded in etl_failures (use --retry-failed to take them again)", self.known_failures
            )

    def total(self) -> int | None:
        if self.null_rows is None:
            return None
        total = self.null_rows - self.known_failures
        if self.settings.limit is not None:
            total = min(total, self.settings.limit)
        return max(total, 0)


def run_backfill(settings: "Settings", out: TextIO | None = None) -> int:
    """Fill the embedding column (then, with --follow, keep it filled); returns the process exit code."""
    out = out or sys.stdout
    started = time.monotonic()
    processes = process_count(settings.workers)
    importer = None
    if settings.provider != "local":
        check_provider(settings)  # fails fast on a missing key; the real clients live in the workers
        # The SDK takes half a second to import: import it while the database is checked and
        # the ranges planned, before the fork, so that every worker shares it.
        importer = threading.Thread(target=_load_client_library, daemon=True)
        importer.start()
    context = multiprocessing.get_context("fork")
    limiter = RateLimiter(context, settings.rpm, settings.tpm, settings.workers)
    shape = Shape(context)
    target, ranges, lease, identity = prepare(settings, processes, limiter, shape)
    logs.set_column(f"{target.display}.{target.embedding_column}")  # in every JSON log line
    if importer is not None:
        importer.join()
    if settings.tpm or settings.dry_run or shape["own_usage"]:
        load_encoding()  # exact counts needed: load once, before the fork, so every worker shares it
    if settings.dry_run:
        return dry_run(settings, target, ranges, out)
    assert lease is not None  # taken by every run but a dry one

    run = Run(settings, target, processes, context, limiter, shape, lease, identity)
    previous = {sig: signal.signal(sig, run.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    counts = _Counts(settings, target)
    still_null = None
    try:
        finished = run.embed(ranges, counts)
        if finished and settings.follow:
            indexes.restore(settings, target, lease.run_id)  # the backlog is done: search needs it
            Follower(run).follow()
        elif finished and settings.limit is None:
            still_null = run.sweep()
    finally:
        run.lease.release()
        run.embedder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if run.progress is not None:
            run.progress.update(run.totals(), force_line=True)
            run.progress.close()

    if counts.ready.wait(timeout=2.0):
        counts.announce()
    totals = run.totals()
    elapsed = time.monotonic() - started
    print(summary_line(settings, totals, elapsed, counts.known_failures, still_null), file=out, flush=True)
    if totals["truncated"]:
        log.warning(
            "%d inputs were longer than %d tokens and were truncated before sending",
            totals["truncated"],
            settings.input_token_limit,
        )
    if still_null:
        log.warning(
            "%d rows are still NULL and no run is on them: the application wrote them while this run went "
            "(inserted, or edited while their request was out); rerun, or keep the column filled with --follow",
            still_null,
        )
    if run.fatal is not None or run.received:
        indexes.say_waiting(settings, target)
    if run.fatal is not None:
        raise EtlError(str(run.fatal))
    if not run.received:
        indexes.restore(settings, target)
    if run.received:
        signum = run.received[0]
        log.warning("interrupted by %s: committed batches are kept; rerun to resume", signal.Signals(signum).name)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    if totals["failed"]:
        log.warning(
            "%d rows could not be embedded; each is recorded in etl_failures "
            "(`python etl.py status` shows why; rerun with --retry-failed to try them again)",
            totals["failed"],
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _load_client_library() -> None:
    try:
        load_client_library()
    except Exception:  # each worker then imports it itself and reports any error
        log.debug("loading the API client library before the fork failed", exc_info=True)


def dry_run(settings: "Settings", target: "Target", ranges: list["Range"], out: TextIO) -> int:
    """Plan without calling the API: rows, tokens, cost, time at the rate limits, ranges."""
    conn = db.connect(settings.database_url)
    try:
        null_rows = catalog.count_null(conn, target)
        known = 0 if settings.retry_failed else catalog.count_known_failures(conn, target)
        with conn.cursor() as cur:
            cur.execute(target.query("claim/sample_texts"), {"limit": 1000})
            samples = cur.fetchall()
        conn.rollback()
    finally:
        conn.close()
    rows = max(0, null_rows - known)
    if settings.limit is not None:
        rows = min(rows, settings.limit)
    mean = mean_tokens((row_text(values) for values in samples), settings.input_token_limit)
    tokens = int(mean * rows)
    cost = estimate_cost(settings.model_name, tokens, settings.price, batch=settings.batch_api)
    minutes: list[float] = []
    if settings.tpm:
        minutes.append(tokens / settings.tpm)
    if settings.rpm:
        minutes.append(rows / settings.batch_size / settings.rpm)
    print(
        f"dry-run table={target.display} rows_to_embed={rows} skipped_known_failures={known} "
        f"estimated_tokens={tokens} tokens_per_row={mean:.1f} sample_rows={len(samples)} "
        f"estimated_cost_usd={'unknown' if cost is None else f'{cost:.4f}'} "
        f"estimated_time={format_eta(max(minutes) * 60) if minutes else 'unbounded (no ETL_TPM or ETL_RPM set)'} "
        f"model={settings.model_name} workers={settings.workers} batch_size={settings.batch_size} "
        f"ranges={len(ranges)}" + (" batch_api=yes" if settings.batch_api else ""),
        file=out,
    )
    processes = process_count(settings.workers)
    print(
        f"ranges: processes w1..w{processes} take ranges 1..{min(processes, len(ranges))} first, then each free "
        "one takes the next; ranges shrink toward the end so that they finish together",
        file=out,
    )
    for index, (after, upto) in enumerate(ranges):
        low = "(start" if after is None else f"({after}"
        high = "end)" if upto is None else f"{upto}]"
        print(f"range {index + 1}: {low}, {high}", file=out)
    return EXIT_OK
