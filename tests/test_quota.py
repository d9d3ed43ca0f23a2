"""A shared quota: a 429 never fails a row, runs that use one API key split its budgets through
PostgreSQL, a run adapts to what the server grants, and it stops when nothing has succeeded
for --stall-seconds."""

import subprocess
import sys
import threading
import time

import openai
import pytest

from tests.conftest import ETL, check_table, env_for_table, make_foods
from tests.fake_openai import FakeOpenAI
from tests.test_errors import one_line_error

TPM = 60_000
ROWS = 1500  # about 11 tokens a row: 16,500 tokens, about 11 s of this quota after its 5 s burst


def ledger_rows(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl_failures")
        return cur.fetchone()[0]


def quota_fake(etl):
    """The fake with a tokens-per-minute quota that answers 429 past it (a bucket of 5 s)."""
    etl.fake.stop()
    etl.fake = FakeOpenAI(tokens_per_minute=TPM, burst_seconds=5.0).start()
    return etl.fake


def run_two_at_once(etl, tmp_path, *args):
    """Two runs of the same command, separate processes in separate working directories, as on two hosts."""
    runs = []
    for host in ("host-a", "host-b"):
        home = tmp_path / host
        home.mkdir()
        command = [sys.executable, ETL, "--workers", "4", "--batch-size", "10", *args]
        runs.append(
            subprocess.Popen(
                command,
                cwd=home,
                env=etl.env(**env_for_table(EMBEDDING_DIMENSIONS=8)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [(run.wait(timeout=180), *run.communicate()) for run in runs]


def assert_quota_shared_cleanly(etl, db, results):
    for code, out, err in results:
        assert code == 0, err
        assert " failed=0 " in out
    assert ledger_rows(db) == 0
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == ROWS
    limited, requests = etl.fake.statuses[429], etl.fake.requests
    assert limited < 0.02 * requests, f"{limited} of {requests} requests were answered 429"


def test_two_runs_that_were_not_told_the_limit_share_it(etl, db, tmp_path):
    make_foods(db, ROWS)
    quota_fake(etl)
    assert_quota_shared_cleanly(etl, db, run_two_at_once(etl, tmp_path))


def test_two_runs_told_the_whole_limit_split_it(etl, db, tmp_path):
    make_foods(db, ROWS)
    quota_fake(etl)
    results = run_two_at_once(etl, tmp_path, "--max-tokens-per-minute", str(TPM))
    assert_quota_shared_cleanly(etl, db, results)
    assert any("2 runs share this API key's quota now" in err for _, _, err in results)


def test_another_client_spending_half_the_quota_fails_no_row(etl, db):
    make_foods(db, ROWS)
    fake = quota_fake(etl)
    stop = threading.Event()

    def other_client():  # about 500 tokens a second: half the quota, with its own SDK retries
        client = openai.OpenAI(api_key="test-key", base_url=fake.base_url, max_retries=5)
        while not stop.is_set():
            started = time.monotonic()
            client.embeddings.create(model="tiny-embed", input=["a lunch order of the other app"] * 50)
            stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    try:
        result = etl.run("--workers", "4", "--batch-size", "10", **env_for_table(EMBEDDING_DIMENSIONS=8), timeout=180)
    finally:
        stop.set()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert " failed=0 " in result.stdout
    assert ledger_rows(db) == 0
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == ROWS


@pytest.mark.parametrize("asked", [{"retry-after-ms": "200"}, {"retry-after": "3600"}])
def test_a_quota_that_never_frees_stops_the_run_after_stall_seconds(etl, db, asked):
    make_foods(db, 50)
    etl.fake.add_faults(*[{"status": 429, "headers": asked}] * 10_000)
    started = time.monotonic()
    result = etl.run("--workers", "2", "--stall-seconds", "3", **env_for_table(EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    message = one_line_error(result)
    assert message.startswith(
        "error: rate limited for 3 s with no request succeeding (--stall-seconds 3): "
        "another client may be using this key's quota"
    ), message
    assert ledger_rows(db) == 0  # nothing was wrong with the rows
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NOT NULL")
        assert cur.fetchone()[0] == 0


def test_an_exhausted_account_stops_at_once(etl, db):
    make_foods(db, 200)
    etl.fake.add_faults(
        *[
            {
                "status": 429,
                "code": "insufficient_quota",
                "message": "You exceeded your current quota, please check your plan and billing details.",
            }
        ]
        * 8
    )
    result = etl.run("--workers", "2", "--batch-size", "10", **env_for_table(EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 1
    assert "error: the account's quota is used up (429: You exceeded your current quota" in one_line_error(result)
    assert etl.fake.requests <= 2  # one per request slot: the first answer stops the others before they send
    assert ledger_rows(db) == 0
