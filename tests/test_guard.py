"""The model guard: a column holds vectors of one model, provider, dimension count and recipe."""

import signal

import pytest

from embedfill.guard import RESET_LOCK_KEY
from tests.conftest import check_table, env_for_table, expected_vector, make_foods, row_text
from tests.test_resilience import wait_for

DIMS = {"EMBEDDING_DIMENSIONS": 8}
SMALL = "text-embedding-3-small vectors"


def record(db, table="foods"):
    with db.cursor() as cur:
        cur.execute(
            "SELECT model, dimensions, provider, recipe, origin_unknown FROM etl_columns WHERE table_name = %s",
            (f"public.{table}",),
        )
        return cur.fetchall()


def counts(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(embedding), count(*) - count(embedding) FROM foods")
        return cur.fetchone()


@pytest.mark.parametrize(
    "verb, change, message",
    [
        (
            [],
            {"EMBEDDING_MODEL": "text-embedding-3-large"},
            f"foods.embedding holds {SMALL}; this run would add text-embedding-3-large ones. Fill a new column "
            "(--embedding-column embedding_v2, created by init --dimensions N) or clear this one first "
            "(init --reset-column --yes)",
        ),
        (
            [],
            {"ETL_TEXT_COLUMNS": "name,description"},
            f"foods.embedding holds {SMALL} (text: name,category,description); "
            "this run would add text-embedding-3-small ones (text: name,description).",
        ),
        (
            [],
            {"ETL_PROVIDER": "local"},
            f"foods.embedding holds {SMALL} from FAKE; this run would add local-hashing ones from local.",
        ),
        (["--dry-run"], {"EMBEDDING_MODEL": "text-embedding-3-large"}, "this run would add text-embedding-3-large"),
        (["verify"], {"EMBEDDING_MODEL": "text-embedding-3-large"}, "this run would add text-embedding-3-large"),
    ],
)
def test_another_model_provider_or_recipe_is_refused_before_any_request(etl, db, verb, change, message):
    make_foods(db, 40)
    first = etl.run("--limit", "20", **env_for_table(**DIMS))
    assert first.returncode == 0, first.stderr
    held = record(db)
    assert held == [("text-embedding-3-small", 8, etl.fake.host, ["name", "category", "description"], False)]
    requests = etl.fake.requests

    refused = etl.run(*verb, **{**env_for_table(**DIMS), **change})
    assert refused.returncode == 1, refused.stderr
    assert message.replace("FAKE", etl.fake.host) in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == ""
    assert etl.fake.requests == requests  # no request sent
    assert counts(db) == (20, 20) and record(db) == held  # nothing written
    embedded, _ = check_table(db)
    assert len(embedded) == 20


@pytest.mark.parametrize("stale_statistics", [False, True])
def test_a_column_with_vectors_of_unknown_origin_is_adopted_with_a_warning(etl, db, stale_statistics):
    make_foods(db, 30)
    with db.cursor() as cur:  # written by someone else, before the tool saw the column
        if stale_statistics:  # the last ANALYZE saw the column all NULL: it is not believed
            cur.execute("ANALYZE foods")
        cur.execute("SELECT id, name, category, description FROM foods WHERE id <= 10")
        for row_id, *values in cur.fetchall():
            cur.execute(
                "UPDATE foods SET embedding = %s::vector WHERE id = %s",
                (str(list(map(float, expected_vector(row_text(values), 8)))), row_id),
            )
    status = etl.run("status", **env_for_table())
    assert "column foods.embedding: no record yet" in status.stdout

    first = etl.run(**env_for_table(**DIMS))
    assert first.returncode == 0, first.stderr
    assert (
        "foods.embedding already held vectors when this tool first saw it: recorded as text-embedding-3-small "
        f"vectors of 8 dimensions from {etl.fake.host} (text: name,category,description), but their origin is unknown"
    ) in first.stderr
    assert record(db) == [("text-embedding-3-small", 8, etl.fake.host, ["name", "category", "description"], True)]
    assert etl.fake.inputs == 20
    embedded, null = check_table(db)
    assert len(embedded) == 30 and null == []

    again = etl.run(**env_for_table(**DIMS))
    assert again.returncode == 0 and "origin is unknown" not in again.stderr
    status = etl.run("status", **env_for_table())
    assert (
        f"column foods.embedding holds text-embedding-3-small vectors of 8 dimensions from {etl.fake.host} "
        "(text: name,category,description) (recorded "
    ) in status.stdout
    assert "; vectors already there then: origin unknown)" in status.stdout


def test_a_fresh_column_is_recorded_without_a_warning(etl, db):
    make_foods(db, 10)
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert "origin is unknown" not in result.stderr
    assert record(db)[0][4] is False


def test_reset_column_clears_vectors_record_and_failures_then_another_model_fills_it(etl, db):
    make_foods(db, 25_000)
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = array_fill(0.5, ARRAY[8])::vector WHERE id > 5")
    result = etl.run(**env_for_table(**DIMS))  # adopts the column, embeds ids 1..5
    assert result.returncode == 0, result.stderr
    with db.cursor() as cur:
        cur.execute("INSERT INTO etl_failures (table_name, row_id, reason) VALUES ('public.foods', '7', 'x')")

    refused = etl.run("init", "--reset-column", **env_for_table())
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: init --reset-column sets foods.embedding to NULL in every row and forgets what it held "
        "and the table's failed rows: add --yes to do it"
    )
    assert counts(db) == (25_000, 0) and len(record(db)) == 1

    reset = etl.run("init", "--reset-column", "--yes", **env_for_table())
    assert reset.returncode == 0, reset.stderr
    assert (
        "column foods.embedding: 25000 vectors set to NULL; its record and the table's rows in etl_failures cleared"
    ) in reset.stdout
    assert counts(db) == (0, 25_000) and record(db) == []
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM etl_failures")
        assert cur.fetchone()[0] == 0

    large = etl.run("--limit", "30", **env_for_table(EMBEDDING_MODEL="text-embedding-3-large", **DIMS))
    assert large.returncode == 0, large.stderr
    assert "origin is unknown" not in large.stderr
    assert record(db)[0][:3] == ("text-embedding-3-large", 8, etl.fake.host)
    embedded, _ = check_table(db)
    assert len(embedded) == 30


def test_the_demo_forgets_its_record_when_it_recreates_its_table(etl, db):
    local = etl.run("demo", "--rows", "50", OPENAI_API_KEY=None)
    assert local.returncode == 0, local.stderr
    assert record(db, "embedfill_demo") == [("local-hashing", 256, "local", ["name", "category", "description"], False)]
    keyed = etl.run("demo", "--rows", "50", **DIMS)
    assert keyed.returncode == 0, keyed.stderr
    assert record(db, "embedfill_demo")[0][:3] == ("text-embedding-3-small", 8, etl.fake.host)
    embedded, null = check_table(db, table="embedfill_demo")
    assert len(embedded) == 50 and null == []
    assert etl.fake.inputs == 50


def test_two_runs_of_different_models_started_together_agree_on_one(etl, db):
    make_foods(db, 200)
    runs = [
        etl.start("--workers", "2", **env_for_table(EMBEDDING_MODEL=model, **DIMS))
        for model in ("text-embedding-3-small", "text-embedding-3-large")
    ]
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    winner = ("text-embedding-3-small", "text-embedding-3-large")[[code for code, _, _ in results].index(0)]
    loser_err = next(err for code, _, err in results if code == 1)
    assert "this run would add" in loser_err and len(loser_err.strip().splitlines()) == 1
    assert record(db)[0][0] == winner
    assert etl.fake.inputs == 200 and counts(db) == (200, 0)


def test_reset_column_refuses_while_a_run_or_a_pending_batch_may_write(etl, db):
    make_foods(db, 400)
    etl.fake.latency = 0.2
    run = etl.start("--workers", "1", "--batch-size", "5", **env_for_table(**DIMS))
    assert wait_for(lambda: counts(db)[0] >= 5)
    refused = etl.run("init", "--reset-column", "--yes", **env_for_table())
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: 1 run(s) with a live lease on foods: stop them (`python etl.py status` lists them) before "
        "init --reset-column; nothing was cleared"
    )
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=30)
    filled = counts(db)[0]
    assert filled >= 5 and len(record(db)) == 1  # the run's vectors and the record are still there

    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO etl_batches (key, table_name, batch_id, state, row_count) "
            "VALUES ('embedfill-k', 'public.foods', 'batch_1', 'in_progress', 10)"
        )
    refused = etl.run("init", "--reset-column", "--yes", **env_for_table())
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: 1 pending --batch-api batch(es) on foods: land them (rerun --batch-api) or "
        "`python etl.py batches cancel` before init --reset-column; nothing was cleared"
    )
    assert counts(db)[0] == filled and len(record(db)) == 1

    with db.cursor() as cur:
        cur.execute("UPDATE etl_batches SET state = 'cancelled'")
    reset = etl.run("init", "--reset-column", "--yes", **env_for_table())
    assert reset.returncode == 0, reset.stderr
    assert counts(db) == (0, 400) and record(db) == []


def test_a_run_refuses_to_start_while_a_reset_clears_the_column(etl, db):
    make_foods(db, 20)
    with db.cursor() as cur:  # what init --reset-column holds while it clears, from another session
        cur.execute("SELECT pg_advisory_lock(%s, hashtext('public.foods'))", (RESET_LOCK_KEY,))
    try:
        refused = etl.run(**env_for_table(**DIMS))
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1] == (
            "error: init --reset-column is clearing foods.embedding now: run again once it ends"
        )
        again = etl.run("init", "--reset-column", "--yes", **env_for_table())
        assert again.returncode == 1
        assert again.stderr.strip().splitlines()[-1] == (
            "error: another init --reset-column is clearing foods now: wait for it to end"
        )
        assert counts(db) == (0, 20) and record(db) == []  # nothing written, nothing recorded
    finally:
        with db.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s, hashtext('public.foods'))", (RESET_LOCK_KEY,))
    assert etl.run(**env_for_table(**DIMS)).returncode == 0
    assert counts(db) == (20, 0)
