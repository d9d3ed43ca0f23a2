"""Machine-readable output: `--json` on status, search and verify; `embed` prints a query vector."""

import json

import numpy as np

from tests.conftest import env_for_table, make_foods
from tests.fake_openai import expected_vector

ENV = env_for_table(EMBEDDING_DIMENSIONS=8)
TEXT = "food 17\ncategory 2\ndescription of 17"


def filled(etl, db, rows=40):
    make_foods(db, rows)
    result = etl.run(**ENV)
    assert result.returncode == 0, result.stderr


def test_search_json_and_embed_use_the_columns_model(etl, db):
    filled(etl, db)
    text = etl.run("search", TEXT, "--top", "3", **ENV)
    found = etl.run("search", TEXT, "--top", "3", "--json", **ENV)
    assert found.returncode == 0, found.stderr
    document = json.loads(found.stdout)
    assert {key: document[key] for key in ("table", "column", "model", "dimensions", "query")} == {
        "table": "foods", "column": "embedding", "model": "text-embedding-3-small", "dimensions": 8, "query": TEXT,
    }  # fmt: skip
    assert document["rows"][0] == {"id": "17", "distance": document["rows"][0]["distance"], "text": TEXT}
    assert [(row["id"], f"{row['distance']:.4f}") for row in document["rows"]] == [
        (line.split()[1], line.split()[0]) for line in text.stdout.splitlines()
    ]  # the same rows as the text output

    vector = etl.run("embed", TEXT, **ENV)
    assert vector.returncode == 0, vector.stderr
    document = json.loads(vector.stdout)
    assert list(document) == ["model", "dimensions", "embedding"]
    assert document["model"] == "text-embedding-3-small" and document["dimensions"] == 8
    assert np.allclose(document["embedding"], expected_vector(TEXT, 8), atol=1e-7)

    other = etl.run("embed", TEXT, **env_for_table(EMBEDDING_DIMENSIONS=8, EMBEDDING_MODEL="text-embedding-3-large"))
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.strip().splitlines()[-1] == (
        "error: foods.embedding holds text-embedding-3-small vectors; a text-embedding-3-large query cannot be "
        "compared with them: embed with the model and dimensions that filled the column"
    )


def test_status_json(etl, db):
    make_foods(db, 30)
    assert etl.run("--limit", "10", **ENV).returncode == 0
    with db.cursor() as cur:
        cur.execute("INSERT INTO etl_failures (table_name, row_id, reason) VALUES ('public.foods', '30', 'empty text')")
        cur.execute("ANALYZE foods")
    result = etl.run("status", "--json", **ENV)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["table"] == "foods" and document["rows_total_estimate"] == 30
    assert (document["rows_null"], document["rows_failed"], document["run_active"]) == (20, 1, False)
    assert document["failures"] == [{"reason": "empty text", "rows": 1}]
    assert document["holds"]["model"] == "text-embedding-3-small" and document["holds"]["dimensions"] == 8
    assert document["holds"]["recipe"] == ["name", "category", "description"]
    assert document["tracking"] is False and document["runs"] == [] and document["batches"] == []


def test_verify_json_names_the_mismatched_rows(etl, db):
    filled(etl, db, rows=20)
    with db.cursor() as cur:  # rows 2 and 5 swap their vectors
        cur.execute("UPDATE foods f SET embedding = o.embedding FROM foods o WHERE (f.id, o.id) IN ((2, 5), (5, 2))")
    result = etl.run("verify", "--all", "--json", **ENV)
    assert result.returncode == 3, result.stderr
    document = json.loads(result.stdout)
    assert (document["checked"], document["mismatched"], document["unchecked"]) == (20, 2, 0)
    assert sorted((row["id"], row["holds_vector_of"]) for row in document["rows"]) == [("2", "5"), ("5", "2")]
    assert document["rows"][0]["explanation"].startswith(f"row {document['rows'][0]['id']}: holds the vector of row")
    assert document["fixed"] is None and document["tokens"] > 0
