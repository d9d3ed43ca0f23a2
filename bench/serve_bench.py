"""The serve scenario of bench/run_bench.py (`--only serve`): one `etl.py serve` keeps three tracked
tables filled while a writer inserts and edits rows in each at a steady rate. Measured: the whole
service's memory (the sum of PSS over its processes, pool processes included) each quarter of the
run, and each table's lag from a row's write to its vector (p50 and p99, by the database's clock: a
bench trigger stamps the moment the vector lands)."""

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg2

TABLES = ("articles", "products", "comments")
SETTINGS = ["--workers", "4", "--batch-size", "50", "--poll-seconds", "5"]


def _create(url, backlog):
    from embedfill.demo import generate_rows, line_reader

    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for table in TABLES:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(
                f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text, category text, "
                "description text, embedding vector(1536), written_at timestamptz DEFAULT clock_timestamp(), "
                "embedded_at timestamptz)"
            )
            # The bench's own trigger: when the vector lands, the moment is stamped (the lag's end).
            cur.execute(
                f"CREATE FUNCTION {table}_landed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.embedding IS NOT NULL THEN NEW.embedded_at := clock_timestamp(); END IF; RETURN NEW; END $$"
            )
            cur.execute(
                f"CREATE TRIGGER {table}_landed BEFORE UPDATE OF embedding ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_landed()"
            )
            cur.copy_expert(
                f"COPY {table} (name, category, description) FROM STDIN", line_reader(generate_rows(backlog, seed=7))
            )
            cur.execute(f"CREATE INDEX ON {table} (id) WHERE embedding IS NULL")
    conn.close()


def _writer(url, seconds, rate, stop):
    """Inserts `rate` rows a second into each table and edits a tenth as many, in a transaction every 0.1 s."""
    from embedfill.demo import generate_rows

    conn = psycopg2.connect(url)
    conn.autocommit = True
    started, tick = time.monotonic(), 0
    rows = iter(generate_rows(10_000_000, seed=11))
    while time.monotonic() - started < seconds and not stop.is_set():
        with conn.cursor() as cur:
            for table in TABLES:
                values = [next(rows).rstrip("\n").split("\t") for _ in range(max(1, rate // 10))]
                cur.executemany(f"INSERT INTO {table} (name, category, description) VALUES (%s, %s, %s)", values)
                if tick % 10 == 0:  # edits: the tracking trigger sets their vector to NULL
                    cur.execute(
                        f"UPDATE {table} SET description = description || ' (edited)', written_at = clock_timestamp() "
                        f"WHERE id IN (SELECT id FROM {table} WHERE embedding IS NOT NULL ORDER BY random() "
                        f"LIMIT {max(1, rate // 10)})"
                    )
        tick += 1
        time.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))
    conn.close()


def serve_scenario(url, base_url, root, seconds, rate, backlog, tree, pss_kb):
    """Returns (memory MB at the end of each quarter, {table: (p50 s, p99 s, rows)}, settings)."""
    _create(url, backlog)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "OPENAI_", "EMBEDDING_"))}
    env.update(DATABASE_URL=url, OPENAI_API_KEY="test-key", OPENAI_BASE_URL=base_url, ETL_LOG_LEVEL="WARNING")
    etl = [sys.executable, str(root / "etl.py")]
    for table in TABLES:
        subprocess.run(
            [*etl, "init", "--track-changes", "--table", table, "--text-columns", "name,category,description"],
            env=env,
            cwd=root,
            check=True,
            capture_output=True,
        )
    process = subprocess.Popen([*etl, "serve", *SETTINGS], env=env, cwd=root, stderr=subprocess.PIPE, text=True)
    conn = psycopg2.connect(url)
    conn.autocommit = True

    def waiting():
        with conn.cursor() as cur:
            cur.execute("SELECT " + " + ".join(f"(SELECT count(*) FROM {t} WHERE embedding IS NULL)" for t in TABLES))
            return cur.fetchone()[0]

    while waiting():  # the backlogs first
        time.sleep(0.2)
    with conn.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        steady_from = cur.fetchone()[0]
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(url, seconds, rate, stop), daemon=True)
    writer.start()
    quarters, peak, started = [], 0.0, time.monotonic()
    while writer.is_alive():
        peak = max(peak, sum(pss_kb(pid) for pid in tree(process.pid)) / 1024)
        if time.monotonic() - started >= seconds * (len(quarters) + 1) / 4:
            quarters.append(peak)
            peak = 0.0
        time.sleep(0.2)
    if len(quarters) < 4:
        quarters.append(peak)
    while waiting():
        time.sleep(0.2)
    lags = {}
    with conn.cursor() as cur:
        for table in TABLES:
            cur.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM embedded_at - written_at)), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM embedded_at - written_at)), count(*) "
                f"FROM {table} WHERE written_at >= %s",
                (steady_from,),
            )
            lags[table] = cur.fetchone()
    conn.close()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    if process.returncode != 143:
        raise SystemExit(f"etl.py serve ended with {process.returncode}: {err[-2000:]}")
    return quarters, lags, " ".join(["serve", *SETTINGS])
