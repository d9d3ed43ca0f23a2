"""Embedding columns as users have them: halfvec, untyped vector and halfvec, a vector index on the column."""

import numpy as np
import pytest
from psycopg2 import sql

from tests.conftest import check_table, env_for_table, expected_vector, make_foods, row_text


def stored_rows(db, table="foods"):
    with db.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT id, name, category, description, embedding::text FROM {} ORDER BY id").format(
                sql.Identifier(table)
            )
        )
        return [(row_id, row_text(values), vector) for row_id, *values, vector in cur.fetchall()]


def assert_half_precision(db, dims, table="foods"):
    """Every row holds its own text's vector, rounded to float16 (exactly what halfvec keeps)."""
    rows = stored_rows(db, table)
    assert rows and all(vector is not None for _, _, vector in rows)
    for row_id, text, vector in rows:
        stored = np.array(vector.strip("[]").split(","), dtype=np.float32)
        expected = expected_vector(text, dims).astype(np.float16).astype(np.float32)
        assert stored.shape == (dims,)
        assert np.allclose(stored, expected, rtol=1e-3, atol=1e-6), f"row {row_id} holds another text's vector"
    return len(rows)


def make_table(db, rows, column_type):
    make_foods(db, rows)
    with db.cursor() as cur:
        cur.execute(f"ALTER TABLE foods ALTER COLUMN embedding TYPE {column_type}")


def test_halfvec_column_right_to_half_precision(etl, db):
    make_table(db, 500, "halfvec(256)")
    result = etl.run("--workers", "2", "--batch-size", "64", **env_for_table(EMBEDDING_DIMENSIONS=256))
    assert result.returncode == 0, result.stderr
    assert assert_half_precision(db, 256) == 500


def test_halfvec_3072_with_an_hnsw_index_then_search_uses_it(etl, db):
    make_table(db, 120, "halfvec(3072)")
    with db.cursor() as cur:
        cur.execute("CREATE INDEX foods_hnsw ON foods USING hnsw (embedding halfvec_cosine_ops)")
    env = env_for_table(EMBEDDING_MODEL="text-embedding-3-large")
    result = etl.run("--workers", "2", "--batch-size", "40", **env)
    assert result.returncode == 0, result.stderr
    assert assert_half_precision(db, 3072) == 120
    text = "food 17\ncategory 2\ndescription of 17"
    found = etl.run("search", text, "--top", "1", **env)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split()[1] == "17"  # distance, id, text: its own text's row comes first


@pytest.mark.parametrize("column_type", ["vector", "halfvec"])
def test_untyped_column_takes_the_models_dimensions(etl, db, column_type):
    make_table(db, 200, column_type)
    result = etl.run("--workers", "2", "--batch-size", "50", **env_for_table(EMBEDDING_DIMENSIONS=24))
    assert result.returncode == 0, result.stderr
    if column_type == "vector":
        embedded, null = check_table(db, dims=24)
        assert len(embedded) == 200 and null == []
    else:
        assert assert_half_precision(db, 24) == 200


def test_init_creates_a_halfvec_column(etl, db):
    make_foods(db, 3)
    with db.cursor() as cur:
        cur.execute("ALTER TABLE foods DROP COLUMN embedding")
    result = etl.run("init", "--dimensions", "16", "--type", "halfvec", **env_for_table())
    assert result.returncode == 0, result.stderr
    assert "column embedding: added as halfvec(16)" in result.stdout
    with db.cursor() as cur:
        cur.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'foods'::regclass "
            "AND attname = 'embedding'"
        )
        assert cur.fetchone()[0] == "halfvec(16)"
    result = etl.run("--workers", "1", **env_for_table(EMBEDDING_DIMENSIONS=16))
    assert result.returncode == 0, result.stderr
    assert assert_half_precision(db, 16) == 3
