"""`etl.py verify`: re-embed stored rows and compare each with the vector stored in it.

A random sample (--sample N, default 100) or every row that holds a vector (--all, keyset
pages of --batch-size) is embedded by a pool of --workers processes, each a worker.Worker
that only embeds: the run's retries, rate limits and run-wide semaphore, so --workers requests
are in flight, one a process. The parent reads the pages, keeps 2 × --workers of them in the
pool, compares (cosine >= 0.99: half precision passes) and explains every mismatch: the
stored vector is the fresh embedding of another row's text (a vector in the wrong row), or of
no text it was compared with (the text was edited since, or another model wrote it).
"""

import collections
import json
import multiprocessing
import multiprocessing.util
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import psycopg2.extras
from pgvector.psycopg2 import register_vector

from . import catalog, db, logs, schema
from .embedders import make_embedder
from .errors import EXIT_OK, EXIT_PARTIAL, EXIT_SIGTERM, EtlError
from .models import estimate_cost
from .progress import Progress
from .ratelimit import RateLimiter
from .shared import SharedState
from .texts import fit, mean_tokens, row_text
from .worker import Row, Worker, pack_requests

SIMILAR = 0.99  # cosine at or above which a stored vector is its text's
NEIGHBOURS = 3  # stored neighbours whose texts are embedded to explain one mismatch
MAX_SEARCHES = 100  # mismatches explained by a kNN query (each reads the table without a vector index)
MAX_MISMATCHES = 1000  # past this the column looks wrong as a whole: stop and say so


@dataclass
class Mismatch:
    row_id: str
    stored: object  # the pgvector Vector read from the row, sent back as is by --fix
    fresh: np.ndarray | None  # the embedding of the row's text now (None: the text is empty)
    source: str | None = None  # the row whose text the stored vector belongs to
    searched: bool = False

    def line(self):
        if self.source is not None:
            return f"row {self.row_id}: holds the vector of row {self.source}'s text"
        if self.fresh is None:
            return f"row {self.row_id}: holds a vector but its text is empty now"
        where = "" if self.searched else "; not compared with other rows' texts"
        return f"row {self.row_id}: not its text's vector (text edited since, or another model{where})"


def cosine(a, b):
    if a is None or b is None or a.shape != b.shape:
        return -1.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm else -1.0


def verify(settings, sample, fix, out, as_json=False):
    """Check `sample` random rows (None: all of them); returns 0 when every one matches, else 3.
    Prints a line per row that does not match and a summary, or with `as_json` one JSON document."""
    started = time.monotonic()
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        schema.ensure(conn)
        catalog.guard_column(conn, settings, target)
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
    pool = context.Pool(settings.workers, _init_pool, (settings, target, shared, limiter, requests, embedder))
    progress = Progress(sys.stderr, interval=settings.progress_interval)
    progress.set_total(total)
    check, finished = Check(), False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID`: end the pool like Ctrl-C does
    pending = collections.deque()  # (page, its result): 2 × --workers pages in the pool, read ahead

    def settle():
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
        check.explain(conn, target, pool, settings.batch_size)
        fixed = check.fix(conn, target) if fix else None
        conn.close()
        finished = True
    finally:
        if finished:
            pool.close()
        else:  # an error or an interrupt: end the processes now
            pool.terminate()
        pool.join()
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


class Check:
    """What the comparison found: rows checked, mismatches (with their vectors), rows not embedded."""

    def __init__(self):
        self.checked = 0
        self.mismatches = []
        self.unchecked = []  # (row_id, reason)

    def compare(self, page, result):
        fresh, failed = result.get()
        for row_id, *_, stored in page:
            if row_id in failed:
                self.unchecked.append((row_id, failed[row_id]))
                continue
            self.checked += 1
            vector = fresh.get(row_id)
            if vector is None or cosine(stored.to_numpy(), vector) < SIMILAR:
                self.mismatches.append(Mismatch(row_id, stored, vector))

    def explain(self, conn, target, pool, batch_size):
        """Find whose text each mismatched vector is: first among the mismatched rows' own texts
        (two rows swapped), then among its nearest stored neighbours, whose texts are embedded
        (a vector copied from a row that is right)."""
        fresh = {m.row_id: m.fresh for m in self.mismatches if m.fresh is not None}
        self._match(fresh)
        wanted, candidates = [m for m in self.mismatches if m.source is None][:MAX_SEARCHES], {}
        for m in wanted:
            m.searched = True
            with conn.cursor() as cur:
                cur.execute(target.query("nearest"), {"query": m.stored, "top": NEIGHBOURS + 1})
                for row_id, *values, distance in cur.fetchall():
                    if row_id not in fresh and distance is not None and distance <= 1 - SIMILAR:
                        candidates[row_id] = row_text(values)
            conn.rollback()
        items = [item for item in candidates.items() if item[1]]
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        for vectors, _ in pool.imap(embed_texts, chunks):
            fresh.update(vectors)
        self._match(fresh)

    def _match(self, fresh):
        for m in self.mismatches:
            if m.source is None:
                stored = m.stored.to_numpy()
                m.source = next((i for i, v in fresh.items() if i != m.row_id and cosine(stored, v) >= SIMILAR), None)

    def fix(self, conn, target):
        """Set the mismatched rows to NULL where they still hold the vector that was checked."""
        values = [(m.row_id, m.stored) for m in self.mismatches]
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(
                cur, target.query("clear_rows").as_string(conn), values, page_size=max(1, len(values))
            )
            fixed = cur.rowcount if values else 0
        conn.commit()
        return fixed

    def records(self):
        """What `lines` says, as dicts for --json."""
        for m in self.mismatches:
            yield {"id": m.row_id, "result": "mismatched", "holds_vector_of": m.source, "explanation": m.line()}
        for row_id, reason in self.unchecked:
            yield {"id": row_id, "result": "unchecked", "holds_vector_of": None, "explanation": reason}

    def lines(self):
        yield from (m.line() for m in self.mismatches)
        yield from (f"row {row_id}: not checked: {reason}" for row_id, reason in self.unchecked)


def pages(conn, target, sample, size):
    """Lists of (row_id, *texts, stored vector): a random sample through one server-side cursor,
    or every row that holds a vector by keyset pages, each read in a short transaction."""
    if sample:
        with conn.cursor(name="etl_verify_sample") as cur:
            cur.execute(target.query("verify_sample"), {"limit": sample})
            while rows := cur.fetchmany(size):
                yield rows
        conn.rollback()
        return
    after = None
    while True:
        with conn.cursor() as cur:
            cur.execute(target.query("verify_page"), {"after": after, "limit": size})
            rows = cur.fetchall()
        conn.rollback()
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def dry_run(conn, settings, target, sample, out, as_json=False):
    """Rows, estimated tokens and cost, without a request."""
    rows = catalog.scalar(conn, target.query("count_embedded"))
    if sample:
        rows = min(rows, sample)
    with conn.cursor() as cur:
        cur.execute(target.query("verify_sample"), {"limit": min(max(rows, 1), 1000)})
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


class Terminated(EtlError):
    exit_code = EXIT_SIGTERM


def _interrupt(signum, frame):
    raise Terminated("interrupted by SIGTERM")


_worker = None


def _init_pool(settings, target, shared, limiter, requests, embedder):
    """Pool initializer: a Worker without a database connection, with its copy of the API client."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent alone decides how to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    number = shared.register_worker()
    logs.set_process_name(f"w{number}")
    _worker = Worker(settings, target, [], shared, limiter, requests, number, embedder)
    _worker.stops_others = False  # the parent reads every page's result, its error included, in order
    multiprocessing.util.Finalize(_worker, _worker.close, exitpriority=10)


def embed_texts(items):
    """Pool task: [(row_id, text)] -> ({row_id: fresh vector}, {row_id: why it was not embedded}),
    each text cut to the model's limit as the run cuts it."""
    settings = _worker.settings
    rows = [Row(row_id, *fit(text, settings.input_token_limit, settings.tpm is not None)[:2]) for row_id, text in items]
    vectors, failed = {}, {}
    try:
        for chunk in pack_requests(rows):
            embedded, failures = _worker.embed_rows(chunk)
            for chunk_rows, matrix in embedded:
                vectors.update(zip((row.row_id for row in chunk_rows), matrix))
            failed.update((row_id, reason) for row_id, reason, _ in failures)
    except EtlError as error:
        raise EtlError(str(error)) from None  # one line, picklable, to the parent
    return vectors, failed
