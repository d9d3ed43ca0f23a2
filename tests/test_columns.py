"""Embedding columns as users have them: halfvec, untyped vector and halfvec, a vector index on the column."""

import os
import signal

import numpy as np
import pytest
from psycopg2 import sql

from tests.conftest import check_table, env_for_table, expected_vector, make_foods, row_text
from tests.test_resilience import embedded_count, wait_for


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


def index_state(db):
    with db.cursor() as cur:
        cur.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = 'foods'::regclass AND NOT indisprimary AND indpred IS NULL"
        )
        live = cur.fetchall()
        cur.execute("SELECT index_name, definition FROM etl_deferred_indexes")
        return live, cur.fetchall()


HNSW = "CREATE INDEX foods_hnsw ON public.foods USING hnsw (embedding vector_cosine_ops) WITH (m='8')"


def with_hnsw(db, rows):
    make_foods(db, rows)
    with db.cursor() as cur:
        cur.execute(HNSW)
        cur.execute("SELECT 'foods_hnsw'::regclass::oid")
        return cur.fetchone()[0]


def test_an_index_on_the_column_is_named_and_never_touched_without_the_flag(etl, db):
    oid = with_hnsw(db, 300)
    result = etl.run("--workers", "2", "--batch-size", "50", **env_for_table(EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 0, result.stderr
    assert "has a vector index on embedding (foods_hnsw)" in result.stderr and "--defer-index" in result.stderr
    with db.cursor() as cur:
        cur.execute("SELECT 'foods_hnsw'::regclass::oid")
        assert cur.fetchone()[0] == oid  # the same index, never dropped
    assert len(check_table(db)[0]) == 300


EXPRESSION = "CREATE INDEX foods_hnsw ON public.foods USING hnsw (((embedding)::halfvec(8)) halfvec_cosine_ops)"


@pytest.mark.parametrize("definition", [HNSW, EXPRESSION])
def test_defer_index_drops_then_rebuilds_the_same_definition(etl, db, definition):
    make_foods(db, 300)
    with db.cursor() as cur:
        cur.execute(definition)
    result = etl.run(
        "--workers",
        "2",
        "--batch-size",
        "50",
        "--defer-index",
        "--index-memory",
        "64MB",
        **env_for_table(EMBEDDING_DIMENSIONS=8),
    )
    assert result.returncode == 0, result.stderr
    assert "dropped foods_hnsw" in result.stderr and "index foods_hnsw rebuilt" in result.stderr
    assert index_state(db) == ([("foods_hnsw", definition)], [])
    assert len(check_table(db)[0]) == 300


@pytest.mark.parametrize("resume", ["rerun", "init --restore-index"])
def test_defer_index_killed_mid_run_then_resumed_brings_the_index_back(etl, db, resume):
    with_hnsw(db, 2000)
    etl.fake.latency = 0.05
    env = env_for_table(EMBEDDING_DIMENSIONS=8)
    run = etl.start("--workers", "2", "--batch-size", "10", "--defer-index", **env)
    assert wait_for(lambda: embedded_count(db) > 100)
    recorded = HNSW.replace("vector_cosine_ops", "public.vector_cosine_ops")  # qualified, as pg_dump writes it
    assert index_state(db) == ([], [("foods_hnsw", recorded)])  # dropped, and its definition kept
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    status = etl.run("status", **env)
    assert "index foods_hnsw dropped by --defer-index" in status.stdout
    etl.fake.latency = 0
    result = etl.run(*resume.split(), **env) if resume != "rerun" else etl.run("--workers", "2", **env)
    assert result.returncode == 0, result.stderr
    assert index_state(db) == ([("foods_hnsw", HNSW)], [])
    if resume == "rerun":
        assert len(check_table(db)[0]) == 2000
    else:
        assert "vector indexes rebuilt: foods_hnsw" in result.stdout


@pytest.mark.parametrize(
    "flags, overrides, code, said",
    [
        (["--dry-run"], {}, 0, "(else the rebuild can take longer than the inserts) (not now: --dry-run)"),
        (["--limit", "10"], {}, 0, "(not with --limit)"),
        ([], {"OPENAI_API_KEY": "wrong"}, 1, "check OPENAI_API_KEY (the vector index was not dropped)"),
        ([], {"EMBEDDING_DIMENSIONS": None}, 1, "returned 1536 dimensions; set EMBEDDING_DIMENSIONS=8 or change"),
    ],
)
def test_defer_index_leaves_the_index_alone_for_a_trial_or_a_run_that_cannot_work(
    etl, db, flags, overrides, code, said
):
    oid = with_hnsw(db, 100)
    result = etl.run("--defer-index", *flags, **{**env_for_table(EMBEDDING_DIMENSIONS=8), **overrides})
    assert result.returncode == code, result.stderr
    assert said in result.stderr
    with db.cursor() as cur:
        cur.execute("SELECT 'foods_hnsw'::regclass::oid")
        assert cur.fetchone()[0] == oid  # the same index, never dropped
        cur.execute("SELECT count(*) FROM etl_deferred_indexes")
        assert cur.fetchone()[0] == 0


@pytest.mark.parametrize("name", ["vector", "halfvec"])
def test_the_binary_format_is_pgvector_pythons_own(name):
    """Each column type packs a vector as pgvector-python's to_binary does (what pgvector's recv reads),
    and the COPY carries exactly those bytes, for random vectors of several sizes."""
    import struct

    from pgvector import HalfVector, Vector

    from embedfill.columns import TYPES, copy_chunks

    kind, reference = TYPES[name], {"vector": Vector, "halfvec": HalfVector}[name]
    rng = np.random.default_rng(21)
    for dims in (1, 3, 384, 1536, 3072):
        vectors = (rng.standard_normal((5, dims)) * 3).astype(np.float32)
        head, values = kind.binary(vectors)
        assert [head + row.tobytes() for row in values] == [reference(row).to_binary() for row in vectors]
        copied = b"".join(copy_chunks([str(i) for i in range(5)], [None] * 5, vectors, kind))
        offset = 19  # the COPY header
        for i, row in enumerate(vectors):
            fields, size = struct.unpack_from(">hi", copied, offset)
            offset += 6 + size + 4  # the id, then the NULL text hash (length -1)
            (length,) = struct.unpack_from(">i", copied, offset)
            assert copied[offset + 4 : offset + 4 + length] == reference(row).to_binary(), (name, dims, i)
            offset += 4 + length
        assert copied[offset:] == struct.pack(">h", -1)
