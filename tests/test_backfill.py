"""The backfill end to end: every row gets the vector of its own text, through the real CLI."""

from tests.conftest import check_table, env_for_table, make_foods


def test_every_row_gets_the_vector_of_its_own_text(etl, db):
    make_foods(db, 500)
    result = etl.run("--workers", "4", "--batch-size", "20", **env_for_table(EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 500
    assert "summary embedded=500 failed=0" in result.stdout
    assert etl.fake.inputs == 500
