"""The backfill end to end through the real CLI: every row gets the vector of its own text."""

import threading

import numpy as np
import pytest

from tests.conftest import check_table, env_for_table, make_foods

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def run_ok(etl, *args, **env):
    result = etl.run(*args, **env_for_table(**DIMS, **env))
    assert result.returncode == 0, result.stderr
    return result


def test_every_row_gets_the_vector_of_its_own_text(etl, db):
    make_foods(db, 500)
    result = run_ok(etl, "--workers", "4", "--batch-size", "20")
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 500
    assert "summary embedded=500 failed=0" in result.stdout
    assert etl.fake.inputs == 500
    assert max(etl.fake.batch_sizes) == 20
    assert max(etl.fake.texts.values()) == 1  # nothing embedded twice


def test_rows_that_already_have_a_vector_are_untouched(etl, db):
    make_foods(db, 200)
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = '[1,1,1,1,1,1,1,1]' WHERE id % 3 = 0")
    run_ok(etl, "--workers", "2")
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE id % 3 = 0 AND embedding = '[1,1,1,1,1,1,1,1]'")
        assert cur.fetchone()[0] == 66
    assert etl.fake.inputs == 200 - 66
    embedded, null = check_table_except_preset(db)
    assert null == [] and len(embedded) == 134


def check_table_except_preset(db):
    with db.cursor() as cur:
        cur.execute("CREATE TEMP VIEW rest AS SELECT * FROM foods WHERE id % 3 <> 0")
    return check_table(db, table="rest")


def test_ids_with_gaps(etl, db):
    ids = sorted(set(np.random.default_rng(7).integers(1, 10_000_000, size=700).tolist()))
    make_foods(db, 0, ids=ids)
    run_ok(etl, "--workers", "3", "--batch-size", "17")
    embedded, null = check_table(db)
    assert null == [] and sorted(map(int, embedded)) == ids


@pytest.mark.parametrize("id_type", ["uuid", "text", "integer"])
def test_other_id_types(etl, db, id_type):
    import uuid

    if id_type == "uuid":
        ids = [str(uuid.UUID(int=int(x))) for x in np.random.default_rng(3).integers(0, 2**62, size=300)]
    elif id_type == "text":
        ids = [f"Food-{n}" for n in range(300)] + ["a", "B", "ä", "10", "9"]
    else:
        ids = list(range(-150, 150))
    make_foods(db, 0, ids=ids, id_type=id_type)
    run_ok(etl, "--workers", "4", "--batch-size", "9")
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == len(ids)
    assert max(etl.fake.texts.values()) == 1


def test_null_and_blank_text_and_several_columns(etl, db):
    texts = [
        ("김치찌개", None, "spicy stew"),  # NULL in the middle is skipped
        ("  ", "soup", ""),  # blank values are skipped
        (None, None, None),  # nothing to embed
        ("", "   ", None),  # only blanks: nothing to embed
        (" padded ", "x", "line1\nline2"),  # values are otherwise unchanged
    ]
    make_foods(db, 0, ids=[1, 2, 3, 4, 5], texts=texts)
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    embedded, null = check_table(db)
    assert sorted(embedded) == ["1", "2", "5"] and sorted(null) == ["3", "4"]
    assert set(etl.fake.texts) == {"김치찌개\nspicy stew", "soup", " padded \nx\nline1\nline2"}
    with db.cursor() as cur:
        cur.execute("SELECT row_id, reason FROM etl_failures ORDER BY row_id")
        assert cur.fetchall() == [("3", "empty text"), ("4", "empty text")]
    assert "summary embedded=3 failed=2" in result.stdout


def test_limit_stops_after_n_rows_and_a_rerun_resumes(etl, db):
    make_foods(db, 300)
    result = run_ok(etl, "--limit", "70", "--workers", "3", "--batch-size", "20")
    assert "summary embedded=70 " in result.stdout
    embedded, null = check_table(db)
    assert len(embedded) == 70 and len(null) == 230
    result = run_ok(etl, "--workers", "3")
    embedded, null = check_table(db)
    assert len(embedded) == 300 and null == []
    assert etl.fake.inputs == 300  # the rerun only looked at rows still NULL
    assert "summary embedded=230 " in result.stdout


def test_resume_after_a_partial_run_with_skewed_nulls(etl, db):
    make_foods(db, 1000)
    with db.cursor() as cur:  # a previous run embedded the first 900 ids
        cur.execute("UPDATE foods SET embedding = array_fill(0.5, ARRAY[8])::vector WHERE id <= 900")
    run_ok(etl, "--workers", "4", "--batch-size", "10")
    assert etl.fake.inputs == 100
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NULL")
        assert cur.fetchone()[0] == 0


def test_two_runs_at_once_never_embed_a_row_twice(etl, db):
    make_foods(db, 1500)
    etl.fake.latency = 0.03
    env = env_for_table(**DIMS)
    first = etl.start("--workers", "3", "--batch-size", "10", **env)
    second = etl.start("--workers", "3", "--batch-size", "10", **env)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 1500
    assert max(etl.fake.texts.values()) == 1
    assert etl.fake.inputs == 1500
    counts = [int(out.split("embedded=")[1].split()[0]) for out in (out1, out2)]
    assert sum(counts) == 1500
    assert min(counts) > 0  # both runs really worked on the table at the same time


def test_schema_qualified_table_and_custom_columns(etl, db):
    with db.cursor() as cur:
        cur.execute("CREATE SCHEMA catalog")
        cur.execute('CREATE TABLE catalog."Items" (item_no bigint PRIMARY KEY, title text, body text, vec vector(8))')
        cur.execute("INSERT INTO catalog.\"Items\" SELECT g, 'title ' || g, 'body ' || g FROM generate_series(1, 50) g")
    result = etl.run(
        "--table",
        "catalog.Items",
        "--id-column",
        "item_no",
        "--text-columns",
        "title,body",
        "--embedding-column",
        "vec",
        **DIMS,
    )
    assert result.returncode == 0, result.stderr
    assert "no partial index on catalog.Items WHERE vec IS NULL" in result.stderr
    assert (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "Items_vec_null_idx" ON "catalog"."Items" ("item_no") '
        'WHERE "vec" IS NULL;' in result.stderr
    )
    with db.cursor() as cur:
        cur.execute('SELECT count(*) FROM catalog."Items" WHERE vec IS NULL')
        assert cur.fetchone()[0] == 0


def test_float_encoding_servers_and_base64_agree(etl, db):
    """The SDK asks for base64; a server that answers floats anyway is understood too."""
    make_foods(db, 60)
    original = etl.fake.handle

    def floats_only(headers, body, *route):
        body = dict(body, encoding_format="float")
        return original(headers, body, *route)

    etl.fake.handle = floats_only
    run_ok(etl, "--batch-size", "7")
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 60


def _rewrite_embeddings(handle, change):
    """Wrap the fake's handler so that each base64 embedding string passes through `change`."""
    import json

    from tests.fake_openai import RawJson

    def handler(headers, body, *route):
        status, out_headers, payload, hang = handle(headers, body, *route)
        if status == 200:
            document = json.loads(payload)
            for item in document["data"]:
                item["embedding"] = change(item["embedding"])
            payload = RawJson(json.dumps(document).encode())
        return status, out_headers, payload, hang

    return handler


def test_base64_with_line_breaks_is_read(etl, db):
    """Servers that wrap base64 at 76 characters (Python's encodebytes) are understood."""
    make_foods(db, 40)
    etl.fake.handle = _rewrite_embeddings(
        etl.fake.handle, lambda text: "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    )
    run_ok(etl, "--batch-size", "7")
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 40


def test_unreadable_base64_is_retried_then_written(etl, db):
    """A response whose vectors cannot be decoded is a transient error, not a traceback."""
    make_foods(db, 30)
    broken = {"left": 1}

    def cut(text):
        return text[:-3] if broken["left"] else text

    handle = _rewrite_embeddings(etl.fake.handle, cut)

    def once_broken(headers, body, *route):
        answer = handle(headers, body, *route)
        broken["left"] = 0
        return answer

    etl.fake.handle = once_broken
    result = run_ok(etl, "--batch-size", "30")
    assert "malformed response: embedding" in result.stderr
    assert " retries=1 " in result.stdout
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 30


def _short_vector(item):
    import base64

    item["embedding"] = base64.b64encode(base64.b64decode(item["embedding"])[:8]).decode()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda data: data.pop(), "the API returned 5 embeddings for 6 inputs"),
        (lambda data: data[1].update(index=data[0]["index"]), "bad or repeated index"),
        (lambda data: _short_vector(data[2]), "vectors of different lengths"),
    ],
)
def test_answers_that_do_not_match_the_inputs_are_retried(etl, db, mangle, message):
    """An answer with a missing vector, a repeated index or a vector of another length is a
    transient error: nothing of it is written, and the retry's answer is."""
    import json

    from tests.fake_openai import RawJson

    make_foods(db, 6)
    handle, broken = etl.fake.handle, {"left": 1}

    def once_broken(headers, body, *route):
        status, out_headers, payload, hang = handle(headers, body, *route)
        if broken["left"]:
            broken["left"] = 0
            document = json.loads(payload)
            mangle(document["data"])
            payload = RawJson(json.dumps(document).encode())
        return status, out_headers, payload, hang

    etl.fake.handle = once_broken
    result = run_ok(etl, "--workers", "1", "--batch-size", "6")
    assert message in result.stderr
    assert " retries=1 " in result.stdout
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 6


def test_progress_lines_when_not_a_terminal(etl, db):
    make_foods(db, 200)
    etl.fake.latency = 0.05
    result = run_ok(etl, "--workers", "2", "--batch-size", "10", "--progress-interval", "0.3")
    lines = [line for line in result.stderr.splitlines() if "progress " in line]
    assert len(lines) >= 2
    keys = [[pair.split("=")[0] for pair in line.split("progress ", 1)[1].split()] for line in lines]
    assert all(k == ["done", "embedded", "failed", "total", "rows_per_s", "eta", "elapsed"] for k in keys)
    assert "done=200 embedded=200 failed=0 total=200" in lines[-1]


def test_a_terminal_gets_one_tqdm_bar(etl, db):
    """On a terminal the parent draws one tqdm bar (workers draw nothing); stdout keeps the summary."""
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import ETL

    make_foods(db, 300)
    etl.fake.latency = 0.02
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    process = subprocess.Popen(
        [sys.executable, ETL, "--workers", "2", "--batch-size", "10"],
        cwd=etl.workdir,
        env=etl.env(**env_for_table(**DIMS)),
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    out, _ = process.communicate(timeout=60)
    os.close(leader)
    assert process.returncode == 0
    text = screen.decode("utf-8", "replace")
    assert "embedding: " in text and "row/s" in text and "300/300" in text
    assert "progress done=" not in text  # no plain lines on a terminal
    assert text.count("embedding: 100%") >= 1
    assert "summary embedded=300" in out


def test_requests_stay_under_300k_tokens_and_2048_inputs(etl, db):
    """--batch-size is the user's knob; a request is split at the API's per-request limits."""
    long_texts = [(f"dish {i} " + "kimchi stew with tofu " * 900, None, None) for i in range(90)]
    make_foods(db, 0, ids=range(1, 91), texts=long_texts)  # about 4,500 tokens each, 400k in all
    result = run_ok(etl, "--workers", "1", "--batch-size", "90")
    assert etl.fake.statuses[400] == 0
    assert len(etl.fake.batch_sizes) >= 2 and sum(etl.fake.batch_sizes) == 90
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 90
    assert "summary embedded=90 " in result.stdout


def test_summary_reports_tokens_and_cost(etl, db):
    make_foods(db, 100)
    result = run_ok(etl)
    tokens = etl.fake.tokens_served
    assert f"tokens={tokens} " in result.stdout
    assert f"cost_usd={tokens * 0.02 / 1e6:.4f}" in result.stdout  # text-embedding-3-small list price
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = NULL")
    etl.fake.reset_counters()
    result = run_ok(etl, "--price-per-million-tokens", "1000")
    assert f"cost_usd={etl.fake.tokens_served * 1000 / 1e6:.4f}" in result.stdout


def test_never_more_requests_in_flight_than_workers(etl, db):
    """Two processes a worker, but --workers requests in flight in the whole run."""
    make_foods(db, 300)
    etl.fake.latency = 0.05
    run_ok(etl, "--workers", "2", "--batch-size", "5")
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 300
    assert etl.fake.inputs == 300 and max(etl.fake.texts.values()) == 1
    assert etl.fake.max_in_flight == 2


def test_runs_started_together_create_the_ledger_once(database_url, db):
    # Runs started by the same cron tick all find no ledger and create it at the same moment;
    # none of them may fail on the catalog's unique index.
    from embedfill import db as store
    from embedfill import schema

    starters = 8
    barrier = threading.Barrier(starters)
    errors = []

    def start():
        conn = store.connect(database_url)
        try:
            barrier.wait()
            schema.ensure(conn)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=start) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = 'etl_failures'")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT version FROM etl_schema")
        assert cur.fetchall() == [(schema.VERSION,)]  # migrated once


def test_the_copy_is_streamed_in_chunks_and_every_vector_lands_in_its_row(database_url, db, monkeypatch):
    from embedfill import catalog, columns, schema
    from embedfill import db as store
    from embedfill import store as copying
    from embedfill.columns import VECTOR, copy_chunks
    from embedfill.settings import resolve
    from embedfill.store import WorkerStore

    make_foods(db, 500)
    monkeypatch.setattr(copying, "COPY_CHUNK_BYTES", 1000)  # 7 rows a chunk: 72 chunks
    monkeypatch.setattr(columns, "COPY_CHUNK_BYTES", 1000)
    chunks = list(copy_chunks(["1"] * 25, [-7] * 25, np.zeros((25, 8), np.float32), VECTOR))
    row = 2 + (4 + 1) + (4 + 8) + (4 + 4 + 8 * 4)  # fields; id; text hash (bigint); vector (dims, unused, values)
    assert len(chunks) == 6 and len(b"".join(chunks)) == 19 + 25 * row + 2  # header, 7+7+7+4, end
    settings = resolve({"database_url": database_url, "table": "foods", "text_columns": ("name",)}, {}, {})
    conn = store.connect(database_url)
    target = catalog.inspect_target(conn, settings)
    schema.ensure(conn)
    writer = WorkerStore(conn, target, "a-run", retry_failed=False)
    claimed = writer.claim(None, None, 500)
    writer.commit()
    ids, hashes = [row[0] for row in claimed], [row[1] for row in claimed]
    vectors = np.random.default_rng(7).standard_normal((len(ids), 8)).astype(np.float32)
    assert writer.write(ids, hashes, vectors) == (500, [], {})
    conn.close()
    with db.cursor() as cur:
        cur.execute("SELECT id::text, embedding::text FROM foods")
        stored = {row_id: np.array(text.strip("[]").split(","), dtype=np.float32) for row_id, text in cur.fetchall()}
    for row_id, vector in zip(ids, vectors):
        assert np.allclose(stored[row_id], vector, atol=1e-6), row_id


def test_the_largest_requests_land_every_vector_in_its_row(etl, db):
    """2048 inputs of 3072 dimensions: 33 MB answers; one request in flight, two processes."""
    make_foods(db, 4096, dims=3072)
    result = etl.run(
        "--workers", "1", "--batch-size", "2048", **env_for_table(EMBEDDING_MODEL="text-embedding-3-large")
    )
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db, dims=3072)
    assert null == [] and len(embedded) == 4096
    assert etl.fake.batch_sizes == [2048, 2048]
    assert etl.fake.max_in_flight == 1
