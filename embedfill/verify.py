"""`etl.py verify`: re-embed stored rows and compare each with the vector stored in it.

A random sample (--sample N, default 100) or every row that holds a vector (--all, keyset
pages of --batch-size) is embedded by a pool of --workers processes through the run's own request path
(requester.py): the run's retries, rate limits and run-wide semaphore, so --workers requests
are in flight, one a process. The parent reads the pages, keeps 2 × --workers of them in the
pool, compares (check.py: cosine >= 0.99, so half precision passes) and explains every
mismatch: the stored vector is the fresh embedding of another row's text (a vector in the wrong
row), or of no text it was compared with (the text was edited since, or another model wrote it).
"""

import collections
import json
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from pgvector.psycopg2 import register_vector

from . import catalog, db, guard, logs, schema
from .check import MAX_MISMATCHES, Check, Fresh
from .errors import EXIT_OK, EXIT_PARTIAL, EtlError, Stop
from .models import estimate_cost
from .pool import watch_parent
from .progress import Progress
from .providers import make_embedder, make_provider
from .ratelimit import RateLimiter
from .requester import Requester, Row
from .shape import Shape
from .shared import SharedState
from .texts import fit, mean_tokens, row_text

if TYPE_CHECKING:
    from multiprocessing.pool import AsyncResult
    from multiprocessing.synchronize import Semaphore

    from .catalog import Target
    from .providers.base import Provider
    from .settings import Settings

Page = list[tuple[Any, ...]]  # (row_id, *texts, stored vector) rows


def verify(settings: "Settings", sample: int | None, fix: bool, out: TextIO, as_json: bool = False) -> int:
    """Check `sample` random rows (None: all of them); returns 0 when every one matches, else 3.
    Prints a line per row that does not match and a summary, or with `as_json` one JSON document."""
    started = time.monotonic()
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        logs.set_column(f"{target.display}.{target.embedding_column}")
        schema.ensure(conn)
        guard.guard_column(conn, settings, target)
        provider = make_provider(settings, target.dimensions)
        shape = Shape(multiprocessing.get_context("fork"))
        shape.load(conn, provider.endpoint, provider.model)
        if settings.dry_run:
            return dry_run(conn, settings, target, sample, out, as_json)
        estimate = catalog.estimate_rows(conn, target)
        total = sample or (max(0, estimate - catalog.count_null(conn, target)) if estimate > 0 else None)
    finally:
        conn.close()  # no socket crosses the fork

    context = multiprocessing.get_context("fork")
    shared = SharedState(context, settings.workers)
    limiter = RateLimiter(context, settings.rpm, settings.tpm, settings.workers)
    requests = context.BoundedSemaphore(settings.workers)
    embedder = make_embedder(settings, target.dimensions)  # built before the fork: see worker.py
    pool = context.Pool(settings.workers, _init_pool, (settings, shared, limiter, requests, shape, embedder))
    progress = Progress(sys.stderr, interval=settings.progress_interval)
    progress.set_total(total)
    check, finished = Check(), False
    previous = signal.signal(signal.SIGTERM, Stop.on_signal)  # `kill PID`: end the pool like Ctrl-C does
    # (page, its result): 2 × --workers pages in the pool, read ahead
    pending: collections.deque[tuple[Page, AsyncResult[Fresh]]] = collections.deque()

    def settle() -> None:
        check.compare(*pending.popleft())
        progress.update({"embedded": check.checked, "failed": len(check.mismatches)})

    try:
        conn = db.connect(settings.database_url)
        register_vector(conn)
        walk = pages(conn, target, sample, settings.batch_size)
        for page in walk:
            items = [(row_id, row_text(values)) for row_id, *values, _ in page]
            pending.append((page, pool.apply_async(embed_texts, ([item for item in items if item[1]],))))
            while len(pending) > 2 * settings.workers or (pending and pending[0][1].ready()):
                settle()
            if len(check.mismatches) >= MAX_MISMATCHES:
                break
        walk.close()  # a sample's server-side cursor, before its transaction ends
        while pending:
            settle()
        check.explain(conn, target, pool, settings.batch_size, embed_texts)
        fixed = check.fix(conn, target) if fix else None
        conn.close()
        finished = True
    finally:
        if finished:
            pool.close()
        else:  # an error or an interrupt: end the processes now
            pool.terminate()
        pool.join()
        shape.keep(settings.database_url, embedder.endpoint, embedder.model)
        embedder.close()
        signal.signal(signal.SIGTERM, previous)
        progress.update({"embedded": check.checked, "failed": len(check.mismatches)}, force_line=True)
        progress.close()

    stopped = len(check.mismatches) >= MAX_MISMATCHES
    tokens = shared.totals()["tokens"]
    cost = estimate_cost(settings.model_name, tokens, settings.price)
    elapsed = time.monotonic() - started
    if as_json:
        document = {
            "table": target.display,
            "column": target.embedding_column,
            "checked": check.checked,
            "mismatched": len(check.mismatches),
            "unchecked": len(check.unchecked),
            "rows": list(check.records()),
            "stopped_early": stopped,
            "fixed": fixed,
            "tokens": tokens,
            "cost_usd": cost,
            "elapsed_s": round(elapsed, 1),
        }
        print(json.dumps(document, ensure_ascii=False), file=out, flush=True)
        return EXIT_PARTIAL if check.mismatches or check.unchecked else EXIT_OK
    for line in check.lines():
        print(line, file=out)
    if stopped:
        print(
            f"stopped after {MAX_MISMATCHES} mismatched rows: the column looks wrong as a whole; "
            "clear it with `python etl.py init --reset-column --yes` and run again",
            file=out,
        )
    if fixed is not None:
        print(f"fixed: {fixed} rows set to NULL; run `python etl.py` to embed them again", file=out)
    print(
        f"verify checked={check.checked} mismatched={len(check.mismatches)} unchecked={len(check.unchecked)} "
        f"tokens={tokens} cost_usd={'unknown' if cost is None else f'{cost:.4f}'} "
        f"elapsed_s={elapsed:.1f}",
        file=out,
        flush=True,
    )
    return EXIT_PARTIAL if check.mismatches or check.unchecked else EXIT_OK


def pages(conn: db.Connection, target: "Target", sample: int | None, size: int) -> Generator[Page, None, None]:
    """Lists of (row_id, *texts, stored vector): a random sample through one server-side cursor,
    or every row that holds a vector by keyset pages, each read in a short transaction."""
    if sample:
        with conn.cursor(name="etl_verify_sample") as cur:
            cur.execute(target.query("search/verify_sample"), {"limit": sample})
            while rows := cur.fetchmany(size):
                yield rows
        conn.rollback()
        return
    after = None
    while True:
        with conn.cursor() as cur:
            cur.execute(target.query("search/verify_page"), {"after": after, "limit": size})
            rows = cur.fetchall()
        conn.rollback()
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def dry_run(
    conn: db.Connection, settings: "Settings", target: "Target", sample: int | None, out: TextIO, as_json: bool = False
) -> int:
    """Rows, estimated tokens and cost, without a request."""
    rows = catalog.scalar(conn, target.query("status/count_embedded"))
    if sample:
        rows = min(rows, sample)
    with conn.cursor() as cur:
        cur.execute(target.query("search/verify_sample"), {"limit": min(max(rows, 1), 1000)})
        texts = [row_text(values) for _, *values, _ in cur.fetchall()]
    conn.rollback()
    mean = mean_tokens(texts, settings.input_token_limit)
    tokens = int(mean * rows)
    cost = estimate_cost(settings.model_name, tokens, settings.price)
    if as_json:
        document = {
            "table": target.display,
            "dry_run": True,
            "rows": rows,
            "estimated_tokens": tokens,
            "estimated_cost_usd": cost,
            "model": settings.model_name,
        }
        print(json.dumps(document), file=out)
        return EXIT_OK
    print(
        f"verify dry-run table={target.display} rows={rows} estimated_tokens={tokens} "
        f"estimated_cost_usd={'unknown' if cost is None else f'{cost:.4f}'} model={settings.model_name} "
        f"workers={settings.workers} batch_size={settings.batch_size} (plus a few texts a mismatched row)",
        file=out,
    )
    return EXIT_OK


_requester: Requester | None = None


def _init_pool(
    settings: "Settings",
    shared: SharedState,
    limiter: RateLimiter,
    slots: "Semaphore",
    shape: Shape,
    embedder: "Provider",
) -> None:
    """Pool initializer: the run's request path without a database, with this process's copy of
    the API client. The parent reads every page's result, its error included, in order: a fatal
    answer does not stop the other processes by itself."""
    global _requester
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent alone decides how to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(os.getppid())
    logs.set_process_name(f"w{shared.register_worker()}")
    _requester = Requester(settings, embedder, shared, limiter, slots, shape, stops_others=False)
    multiprocessing.util.Finalize(_requester, embedder.close, exitpriority=10)


def embed_texts(items: list[tuple[str, str]]) -> Fresh:
    """Pool task: [(row_id, text)] -> ({row_id: fresh vector}, {row_id: why it was not embedded}),
    each text cut to the model's limit as the run cuts it."""
    assert _requester is not None  # set by _init_pool
    settings = _requester.settings
    limit = _requester.input_limit()
    rows = [Row(row_id, *fit(text, limit, settings.tpm is not None)[:2]) for row_id, text in items]
    vectors: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    try:
        embedded, failures = _requester.embed(rows)
    except EtlError as error:
        raise EtlError(str(error)) from None  # one line, picklable, to the parent
    for chunk_rows, matrix in embedded:
        vectors.update(zip((row.row_id for row in chunk_rows), matrix))
    failed.update((row_id, reason) for row_id, reason, _ in failures)
    return vectors, failed
