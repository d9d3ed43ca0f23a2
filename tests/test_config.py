"""Configuration precedence: a flag wins over the environment, which wins over config.env."""

from tests.conftest import check_table, make_foods


def write_config(workdir, **values):
    (workdir / "config.env").write_text("".join(f"{key}={value}\n" for key, value in values.items()))


def test_flag_beats_environment_beats_config_file(etl, db, workdir):
    make_foods(db, 60)
    write_config(
        workdir,
        ETL_TABLE="foods",
        ETL_TEXT_COLUMNS="name,category,description",
        EMBEDDING_DIMENSIONS=8,
        ETL_BATCH_SIZE=5,
        ETL_LIMIT_IGNORED=1,
    )
    result = etl.run("--limit", "10", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert max(etl.fake.batch_sizes) == 5  # from config.env

    etl.fake.reset_counters()
    result = etl.run("--limit", "14", "--workers", "1", ETL_BATCH_SIZE=7)
    assert result.returncode == 0, result.stderr
    assert max(etl.fake.batch_sizes) == 7  # the environment beats config.env

    etl.fake.reset_counters()
    result = etl.run("--workers", "1", "--batch-size", "9", ETL_BATCH_SIZE=7)
    assert result.returncode == 0, result.stderr
    assert max(etl.fake.batch_sizes) == 9  # the flag beats both
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 60


def test_config_file_given_with_config(etl, db, workdir):
    make_foods(db, 10)
    (workdir / "other.env").write_text(
        "ETL_TABLE=foods\nETL_TEXT_COLUMNS=name\nEMBEDDING_DIMENSIONS=8\n# a comment\nETL_WORKERS=2\n"
    )
    result = etl.run("--config", "other.env")
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db, columns=("name",))
    assert len(embedded) == 10


def test_config_env_example_documents_every_setting():
    from pathlib import Path

    from embedfill.config import OPTIONS

    text = (Path(__file__).resolve().parent.parent / "config.env.example").read_text()
    for option in OPTIONS:
        if option.env:
            assert f"{option.env}=" in text, option.env
