"""--batch-api end to end through the real CLI, the real SDK and the fake's Files and Batches
endpoints: every row right, nothing paid twice across kills, refusals isolated, expiry resubmitted."""

import os
import signal

from embedfill.models import estimate_cost
from tests.conftest import check_table, env_for_table, make_foods
from tests.test_resilience import ledger, wait_for

FAST = ("--batch-api", "--poll-seconds", "0.1", "--batch-size", "20")


def env(**extra):
    return env_for_table(EMBEDDING_DIMENSIONS=8, **extra)


def batches(db):
    with db.cursor() as cur:
        cur.execute("SELECT to_regclass('etl_batches') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT key, batch_id, state, row_count, attempts FROM etl_batches ORDER BY created")
        return cur.fetchall()


def batch_rows(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl_batch_rows")
        return cur.fetchone()[0]


def test_every_row_right_through_batches(etl, db):
    make_foods(db, 300)
    etl.fake.batch_retrieves = 3  # pending for two polls; output lines shuffled
    result = etl.run(*FAST, "--batch-rows", "120", **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 300
    assert etl.fake.batch_inputs == 300 and etl.fake.inputs == 0  # all through batches, once
    assert etl.fake.batches_created == 3
    assert [(state, rows) for _, _, state, rows, _ in batches(db)] == [("landed", 120), ("landed", 120), ("landed", 60)]
    assert batch_rows(db) == 0
    assert "summary embedded=300 failed=0" in result.stdout and "batch_api=yes" in result.stdout
    assert "batches pending=3 done=0 rows pending=300 done=0" in result.stderr


def test_sigkill_while_a_batch_is_pending_then_a_rerun_pays_nothing_twice(etl, db):
    make_foods(db, 250)
    etl.fake.batch_retrieves = 10**6  # never done while the first run lives
    run = etl.start(*FAST, "--batch-rows", "100", **env())
    assert wait_for(lambda: len([b for b in batches(db) if b[1]]) == 3)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    assert etl.fake.batch_inputs == 0
    etl.fake.batch_retrieves = 1
    result = etl.run(*FAST, "--batch-rows", "100", **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 250
    assert etl.fake.batches_created == 3 and etl.fake.batch_inputs == 250 and etl.fake.inputs == 0


def test_a_batch_created_just_before_a_kill_is_adopted_through_its_metadata(etl, db):
    make_foods(db, 80)
    result = etl.run(*FAST, "--no-wait", **env())
    assert result.returncode == 0, result.stderr
    with db.cursor() as cur:  # as if killed between creating the batch and recording its id
        cur.execute("UPDATE etl_batches SET batch_id = NULL, state = 'submitting'")
    result = etl.run(*FAST, **env())
    assert result.returncode == 0, result.stderr
    assert "was created before the run stopped: adopting" in result.stderr
    assert etl.fake.batches_created == 1 and etl.fake.batch_inputs == 80
    assert check_table(db)[1] == []


def test_refused_inputs_are_isolated_recorded_and_exit_3(etl, db):
    texts = [(f"dish {i}", "cat", "desc") for i in range(60)]
    texts[33] = ("dish 33", "POISON", "desc")
    make_foods(db, 0, ids=range(1, 61), texts=texts)
    result = etl.run(*FAST, **env())
    assert result.returncode == 3, result.stderr
    embedded, null = check_table(db)
    assert null == ["34"] and len(embedded) == 59
    rows = ledger(db)
    assert [row_id for row_id, _, _ in rows] == ["34"] and "refused by the API: 400" in rows[0][1]
    assert etl.fake.batch_inputs == 40  # the two clean request lines; the refused one's 20 rows:
    assert etl.fake.inputs == 19  # through the normal endpoint, halving down to the culprit
    assert batch_rows(db) == 0


def test_no_wait_submits_and_a_later_run_lands(etl, db):
    make_foods(db, 100)
    result = etl.run(*FAST, "--no-wait", **env())
    assert result.returncode == 0, result.stderr
    assert etl.fake.batch_inputs == 0 and check_table(db)[0] == []
    assert [b[2] for b in batches(db)] == ["validating"] and batch_rows(db) == 100
    status = etl.run("status", **env())
    assert status.returncode == 0, status.stderr
    assert "state=validating" in status.stdout and "rows=100" in status.stdout

    result = etl.run(*FAST, "--no-wait", **env())  # the next cron run lands what has ended
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 100
    assert etl.fake.batches_created == 1 and etl.fake.batch_inputs == 100


def test_an_expired_batch_is_resubmitted_once_then_recorded(etl, db):
    make_foods(db, 100)
    etl.fake.expire_batches = 1  # half its requests run, the rest come back as batch_expired
    result = etl.run(*FAST, **env())
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 100
    assert etl.fake.batches_created == 2 and etl.fake.batch_inputs == 100
    assert [(state, attempts) for _, _, state, _, attempts in batches(db)] == [("landed", 2)]

    make_foods(db, 40, table="more")
    etl.fake.expire_batches = 2
    result = etl.run(*FAST, "--batch-size", "10", **env(ETL_TABLE="more"))
    assert result.returncode == 3, result.stderr
    assert len(check_table(db, table="more")[0]) == 30  # 2 of 4 request lines, then 1 of the 2 left
    assert len(ledger(db)) == 10 and "expired on attempt 2" in ledger(db)[0][1]


def test_a_normal_run_leaves_rows_of_a_pending_batch_alone(etl, db):
    make_foods(db, 300)
    result = etl.run(*FAST, "--no-wait", "--limit", "100", **env())
    assert result.returncode == 0, result.stderr
    result = etl.run("--workers", "2", **env())
    assert result.returncode == 0, result.stderr
    assert etl.fake.inputs == 200
    embedded, null = check_table(db)
    assert len(embedded) == 200 and sorted(map(int, null)) == list(range(1, 101))
    result = etl.run(*FAST, **env())
    assert result.returncode == 0, result.stderr
    assert check_table(db)[1] == [] and etl.fake.batch_inputs == 100


def test_cancel_releases_the_rows(etl, db):
    make_foods(db, 50)
    etl.fake.batch_retrieves = 10**6
    assert etl.run(*FAST, "--no-wait", **env()).returncode == 0
    result = etl.run("batches", "cancel", **env())
    assert result.returncode == 0, result.stderr
    assert "cancelled embedfill-" in result.stdout and "rows=50" in result.stdout
    assert [b[2] for b in batches(db)] == ["cancelled"] and batch_rows(db) == 0
    assert [b["status"] for b in etl.fake.batches.values()] == ["cancelling"]
    result = etl.run(**env())
    assert result.returncode == 0 and etl.fake.inputs == 50


def test_batch_price_is_half(etl, db):
    assert estimate_cost("text-embedding-3-large", 10**6, batch=True) == 0.065
    make_foods(db, 10)
    result = etl.run("--batch-api", "--dry-run", **env(EMBEDDING_MODEL="text-embedding-3-large"))
    assert result.returncode == 0, result.stderr
    assert "batch_api=yes" in result.stdout and etl.fake.batch_inputs == 0


def test_sigterm_while_waiting_exits_143_and_leaves_the_batch_running(etl, db):
    make_foods(db, 60)
    etl.fake.batch_retrieves = 10**6
    run = etl.start(*FAST, **env())
    assert wait_for(lambda: any(b[1] for b in batches(db)))
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=10)
    assert run.returncode == 143, err
    assert "the batches keep running at OpenAI" in err and "summary embedded=0" in out
    assert [b["status"] for b in etl.fake.batches.values()] in (["validating"], ["in_progress"])  # not cancelled
    etl.fake.batch_retrieves = 1
    result = etl.run(*FAST, **env())
    assert result.returncode == 0, result.stderr
    assert check_table(db)[1] == [] and etl.fake.batches_created == 1 and etl.fake.batch_inputs == 60
