"""Bad input: a one-line error naming what to fix, a documented exit code, nothing written."""

import pytest

from embedfill.worker import process_count
from tests.conftest import env_for_table, make_foods


def one_line_error(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def null_count(db, table="foods"):
    with db.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE embedding IS NULL")
        return cur.fetchone()[0]


def test_missing_table(etl, db):
    result = etl.run(**env_for_table(table="nope"))
    assert result.returncode == 1
    assert "table nope does not exist" in one_line_error(result)


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            {"ETL_TEXT_COLUMNS": "name,colour"},
            "column foods.colour does not exist (check ETL_TEXT_COLUMNS or --text-columns)",
        ),
        ({"ETL_ID_COLUMN": "food_id"}, "column foods.food_id does not exist (check ETL_ID_COLUMN or --id-column)"),
        ({"ETL_EMBEDDING_COLUMN": "vec"}, "column foods.vec does not exist; foods has the vector column embedding"),
        ({"ETL_EMBEDDING_COLUMN": "name"}, "column foods.name is text, not a pgvector vector or halfvec column"),
    ],
)
def test_missing_or_wrong_columns(etl, db, override, expected):
    make_foods(db, 5)
    env = env_for_table(EMBEDDING_DIMENSIONS=8)
    env.update(override)
    result = etl.run(**env)
    assert result.returncode == 1
    assert expected in one_line_error(result)
    assert etl.fake.requests == 0
    assert null_count(db) == 5


def test_dimension_mismatch_stops_and_writes_nothing(etl, db):
    make_foods(db, 100)  # vector(8); the model answers 1536 without EMBEDDING_DIMENSIONS
    result = etl.run("--workers", "4", **env_for_table())
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: foods.embedding is vector(8) but text-embedding-3-small returned 1536 dimensions; "
        "set EMBEDDING_DIMENSIONS=8 or change the column"
    )
    assert null_count(db) == 100
    assert etl.fake.requests <= process_count(4)  # at most one request per worker process


def test_configured_dimensions_that_disagree_with_the_column(etl, db):
    make_foods(db, 10)
    result = etl.run(**env_for_table(EMBEDDING_DIMENSIONS=768))
    assert result.returncode == 1
    assert "foods.embedding is vector(8) but EMBEDDING_DIMENSIONS=768" in one_line_error(result)
    assert etl.fake.requests == 0


def test_unreachable_database(etl):
    result = etl.run(DATABASE_URL="postgresql://nobody:secret@127.0.0.1:1/none", **env_for_table())
    assert result.returncode == 1
    line = one_line_error(result)
    assert "cannot connect to the database at 127.0.0.1:1/none" in line and "check DATABASE_URL" in line
    assert "secret" not in result.stderr


@pytest.mark.parametrize(
    "missing, expected",
    [
        ("ETL_TABLE", "ETL_TABLE is not set: set ETL_TABLE in config.env or the environment, or pass --table"),
        ("ETL_TEXT_COLUMNS", "ETL_TEXT_COLUMNS is not set"),
        ("OPENAI_API_KEY", "OPENAI_API_KEY is not set: put it in config.env or the environment"),
    ],
)
def test_missing_settings(etl, db, missing, expected):
    make_foods(db, 5)
    env = env_for_table(EMBEDDING_DIMENSIONS=8)
    env[missing] = None
    result = etl.run(**env)
    assert result.returncode == 1
    assert expected in one_line_error(result)
    assert null_count(db) == 5


def test_bad_key_fails_fast_with_one_request_per_worker_at_most(etl, db):
    make_foods(db, 400)
    result = etl.run("--workers", "3", **env_for_table(EMBEDDING_DIMENSIONS=8, OPENAI_API_KEY="wrong"))
    assert result.returncode == 1
    assert "the API refused the key (401" in one_line_error(result)
    assert "check OPENAI_API_KEY" in result.stderr
    assert 1 <= etl.fake.auth_failures <= 3
    assert null_count(db) == 400


def test_unknown_model(etl, db):
    make_foods(db, 20)
    result = etl.run(**env_for_table(EMBEDDING_DIMENSIONS=8, EMBEDDING_MODEL="text-embedding-9"))
    assert result.returncode == 1
    assert "model text-embedding-9 was not found" in one_line_error(result)
    assert null_count(db) == 20


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--workers", "0"], "argument --workers: must be 1 or more"),
        (["--batch-size", "5000"], "must be at most 2048"),
        (["--wokers", "3"], "unrecognized arguments: --wokers 3 (did you mean --workers?)"),
        (["--limit", "x"], "argument --limit"),
    ],
)
def test_usage_errors_exit_2(etl, args, expected):
    result = etl.run(*args)
    assert result.returncode == 2
    assert expected in result.stderr


def test_bad_value_in_the_environment(etl, db):
    result = etl.run(**env_for_table(ETL_WORKERS="many"))
    assert result.returncode == 1
    assert "ETL_WORKERS='many' in the environment is invalid" in one_line_error(result)


def test_missing_explicit_config_file(etl):
    result = etl.run("--config", "missing.env")
    assert result.returncode == 2
    assert "config file missing.env does not exist" in one_line_error(result)


def test_debug_level_shows_the_traceback(etl, db):
    result = etl.run("--log-level", "DEBUG", **env_for_table(table="nope"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "error: table nope does not exist" in result.stderr


def test_a_misspelled_verb_gets_a_suggestion(etl):
    result = etl.run("staus")
    assert result.returncode == 2
    assert "unrecognized arguments: staus (did you mean status?)" in result.stderr
