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

    from embedfill.options import OPTIONS

    text = (Path(__file__).resolve().parent.parent / "config.env.example").read_text()
    for option in OPTIONS:
        if option.env:
            assert f"{option.env}=" in text, option.env


def test_misspelled_settings_are_named_with_the_closest_one(etl, db, workdir):
    """A misspelled name in config.env or an ETL_ variable is a warning naming the setting it
    resembles; the run goes on with what it did understand (the value is never printed)."""
    make_foods(db, 10)
    (workdir / "config.env").write_text(
        "ETL_TABLE=foods\nETL_TEXT_COLUMNS=name,category,description\nEMBEDDING_DIMENSIONS=8\n"
        "EMBEDING_MODEL=text-embedding-3-large\nETL_WORKER=2\nETL_BATCHSIZE=5\nETL_LIMIT=3\n"
        "OPENAI_API_KYE=sk-secret-value\nOPENAI_ORG_ID=org-1\nDJANGO_SECRET_KEY=other-apps-setting\n"
    )
    result = etl.run("--workers", "1", ETL_BATCH_SIZ="3", ETL_WORKERS="1")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: EMBEDING_MODEL in config.env is not a setting (did you mean EMBEDDING_MODEL?)",
        "warning: ETL_WORKER in config.env is not a setting (did you mean ETL_WORKERS?)",
        "warning: ETL_BATCHSIZE in config.env is not a setting (did you mean ETL_BATCH_SIZE?)",
        "warning: ETL_LIMIT in config.env is not a setting (--limit is a command-line flag only)",
        "warning: OPENAI_API_KYE in config.env is not a setting (did you mean OPENAI_API_KEY?)",
        "warning: OPENAI_ORG_ID in config.env is read by the openai SDK from the environment only: export it",
        "warning: ETL_BATCH_SIZ in the environment is not a setting (did you mean ETL_BATCH_SIZE?)",
    ]
    assert "sk-secret-value" not in result.stderr + result.stdout
    assert etl.fake.batch_sizes == [10]  # the defaults: batch size 20, the default model's name
    embedded, null = check_table(db)
    assert len(embedded) == 10


def test_a_copied_config_env_example_changes_nothing(etl, db, workdir):
    """Every value in config.env.example is commented out: copied unedited it sets nothing."""
    from pathlib import Path

    from embedfill.settings import read_config_file

    example = Path(__file__).resolve().parent.parent / "config.env.example"
    assert read_config_file(str(example), explicit=True) == {}
    (workdir / "config.env").write_text(example.read_text())
    make_foods(db, 12)
    result = etl.run(ETL_TABLE="foods", ETL_TEXT_COLUMNS="name,category,description", EMBEDDING_DIMENSIONS=8)
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stderr
    embedded, null = check_table(db)
    assert len(embedded) == 12 and null == []
