"""From git clone to embedded rows: the embedded database, demo, search, status, dry-run, help."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

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
    assert "summary embedded=500 failed=0 skipped_known_failures=0" in result.stdout and " tokens=0 " in result.stdout
    assert " WARNING " not in result.stderr, result.stderr  # nothing to worry a newcomer (the local provider bills 0)
    # It ends with the URL to use and what to do next; the server it started is down again.
    tail = result.stdout.splitlines()[-4:]
    url = tail[0].removeprefix("DATABASE_URL=")
    assert url == "postgresql://postgres@" + quote(str((home / "pgdata").resolve()), safe="") + "/postgres"
    assert tail[1:] == [
        'next: python etl.py search "김치찌개"',
        "next: python etl.py db url     # keep this server up for psql, Django or psycopg2 and print its URL",
        "next: python etl.py db psql    # psql on it; `python etl.py db stop` stops it",
    ]
    assert not (home / "pgdata" / "postmaster.pid").exists()

    # A later run finds the same data again.
    status = cli("status", cwd=home, env=env)
    assert status.returncode == 0, status.stderr
    assert "status table=embedfill_demo" in status.stdout and "rows_null=0 rows_failed=0" in status.stdout

    import psycopg2

    assert cli("db", "url", cwd=home, env=env).stdout.strip() == url  # up until `db stop`
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, name, category, description FROM embedfill_demo WHERE id = 123")
        row_id, *values = cur.fetchone()
        cur.execute("SELECT count(*) FROM embedfill_demo WHERE embedding IS NULL")
        assert cur.fetchone()[0] == 0
    conn.close()
    query = "\n".join(values)
    found = cli("search", query, "--top", "3", cwd=home, env=env)
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3
    distance, first_id = lines[0].split()[:2]
    assert first_id == str(row_id) and float(distance) == pytest.approx(0.0, abs=1e-5)

    as_json = json.loads(cli("search", query, "--top", "3", "--json", cwd=home, env=env).stdout)
    assert as_json["model"] == "local-hashing" and as_json["dimensions"] == 256
    assert [(row["id"], f"{row['distance']:.4f}") for row in as_json["rows"]] == [
        (line.split()[1], line.split()[0]) for line in lines
    ]
    assert as_json["rows"][0]["text"] == query
    vector = json.loads(cli("embed", query, cwd=home, env=env).stdout)
    assert vector["model"] == "local-hashing" and vector["dimensions"] == 256 == len(vector["embedding"])
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT embedding::text FROM embedfill_demo WHERE id = 123")
        stored = [float(value) for value in cur.fetchone()[0].strip("[]").split(",")]
    conn.close()
    assert vector["embedding"] == pytest.approx(stored, abs=1e-6)  # the same model and settings as the column
    assert cli("db", "stop", cwd=home, env=env).returncode == 0


def test_local_provider_vectors_are_normalized_and_deterministic():
    import numpy as np

    from embedfill.providers import make_embedder
    from embedfill.settings import resolve

    embedder = make_embedder(resolve({"provider": "local", "dimensions": 64}, {}, {}))
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
            re.match(r"run \S+:\d+:[0-9a-f]{8}\.[0-9a-f]{6} share=1/2 no configured budget running_for=", line)
            for line in leases
        ), seen
    finally:
        for run in runs:
            run.terminate()
            run.communicate(timeout=30)


def tool_objects(db):
    with db.cursor() as cur:
        cur.execute(
            "SELECT (SELECT count(*) FROM pg_extension WHERE extname = 'vector'), "
            "array(SELECT relname::text FROM pg_class WHERE relname LIKE 'etl\\_%' AND relkind = 'r' ORDER BY 1)"
        )
        return cur.fetchone()


def test_init_checks_everything_first_then_says_what_it_created(etl, db):
    with db.cursor() as cur:
        cur.execute("DROP EXTENSION vector")
        cur.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
        cur.execute("INSERT INTO docs SELECT g, 'doc ' || g FROM generate_series(1, 30) g")
        cur.execute("CREATE TABLE notes (id bigint, body text)")  # no unique id
    missing = etl.run("init", **env_for_table(table="docs", columns="body"))
    assert missing.returncode == 1
    assert "pass --dimensions N (or set EMBEDDING_DIMENSIONS) to add it as vector(N)" in missing.stderr
    no_key = etl.run("init", "--dimensions", "8", **env_for_table(table="notes", columns="body"))
    assert no_key.returncode == 1 and "notes.id is not known to be unique" in no_key.stderr
    no_column = etl.run("init", "--dimensions", "8", **env_for_table(table="docs", columns="title"))
    assert no_column.returncode == 1 and "column docs.title does not exist" in no_column.stderr
    assert tool_objects(db) == (0, [])  # a failed init created nothing: no extension, no etl_* table

    first = etl.run("init", "--dimensions", "8", **env_for_table(table="docs", columns="body"))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert re.fullmatch(r"extension vector [\d.]+: created", lines[0])
    created = lines[1].removeprefix("tables created: ").removesuffix(" (the tool's ledger, leases and records)")
    assert sorted(created.split(", ")) == tool_objects(db)[1] and "etl_failures" in created
    assert lines[2:] == ["column embedding: added as vector(8)", "partial index docs_embedding_null_idx: created"]
    second = etl.run("init", "--dimensions", "8", **env_for_table(table="docs", columns="body"))
    assert second.returncode == 0
    assert second.stdout.splitlines()[1:] == [
        f"tables: present ({created})",
        "column embedding: present, vector(8)",
        "partial index: present",
    ]
    assert re.fullmatch(r"extension vector [\d.]+: present", second.stdout.splitlines()[0])
    result = etl.run(**env_for_table(table="docs", columns="body", EMBEDDING_DIMENSIONS=8))
    assert result.returncode == 0, result.stderr
    assert "no partial index" not in result.stderr
    embedded, null = check_table(db, table="docs", columns=("body",))
    assert len(embedded) == 30


def test_init_needs_no_text_columns(etl, db):
    """The column and the partial index take no text columns: init runs without ETL_TEXT_COLUMNS
    (it crashed on a TypeError), and only --track-changes asks for them."""
    with db.cursor() as cur:
        cur.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
    first = etl.run("init", "--dimensions", "8", ETL_TABLE="docs")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-2:] == [
        "column embedding: added as vector(8)",
        "partial index docs_embedding_null_idx: created",
    ]
    second = etl.run("init", ETL_TABLE="docs")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-2:] == ["column embedding: present, vector(8)", "partial index: present"]
    tracking = etl.run("init", "--track-changes", ETL_TABLE="docs")
    assert tracking.returncode == 1
    assert tracking.stderr.strip().splitlines()[-1] == (
        "error: init --track-changes needs the text columns: set ETL_TEXT_COLUMNS or --text-columns"
    )
    with db.cursor() as cur:
        cur.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'docs'::regclass "
                    "AND attname = 'embedding'")  # fmt: skip
        assert cur.fetchone() == ("vector(8)",)
        cur.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'docs_embedding_null_idx'")
        assert cur.fetchone() == (1,)


def test_an_interrupted_demo_is_resumed_not_rebuilt(etl, db):
    first = etl.run("demo", "--rows", "300", "--limit", "120", "--workers", "2", OPENAI_API_KEY=None)
    assert first.returncode == 0, first.stderr
    with db.cursor() as cur:
        cur.execute("SELECT id, embedding::text FROM embedfill_demo WHERE embedding IS NOT NULL ORDER BY id")
        kept = cur.fetchall()
    assert len(kept) == 120

    again = etl.run("demo", "--rows", "300", "--workers", "2", OPENAI_API_KEY=None)
    assert again.returncode == 0, again.stderr
    assert re.search(
        r"demo table embedfill_demo in database \w+ on \S+: resuming, 180 of 300 rows still without a vector "
        r"\(another --rows starts a new table\)",
        again.stdout,
    ), again.stdout
    assert "summary embedded=180 failed=0" in again.stdout
    with db.cursor() as cur:
        cur.execute(
            "SELECT id, embedding::text FROM embedfill_demo WHERE id = ANY(%s) ORDER BY id", ([i for i, _ in kept],)
        )
        assert cur.fetchall() == kept  # the same rows, untouched: not a new table
        cur.execute("SELECT count(*), count(embedding) FROM embedfill_demo")
        assert cur.fetchone() == (300, 300)

    done = etl.run("demo", "--rows", "300", "--workers", "2", OPENAI_API_KEY=None)  # nothing left: a new table
    assert done.returncode == 0 and "300 rows, embedding vector(256)" in done.stdout
    assert "summary embedded=300 failed=0" in done.stdout


HELP = {  # verb: (a setting it reads, a setting it does not read, its own example)
    "": ("[env ETL_WORKERS, default 4]", "--updated-column", "python etl.py --workers 4 --batch-size 20"),
    "init": ("[env ETL_TABLE]", "--workers", "python etl.py init --dimensions 1536"),
    "status": ("[env ETL_UPDATED_COLUMN]", "--model", "python etl.py status --json"),
    "demo": ("[env ETL_WORKERS, default 4]", "--table", "python etl.py demo --rows 1000"),
    "search": ("EMBEDDING_MODEL, default text-embedding-3-small]", "--workers", 'python etl.py search "김치찌개"'),
    "embed": ("[env ETL_TABLE]", "--batch-size", 'python etl.py embed "김치찌개"'),
    "verify": ("[env ETL_WORKERS, default 4]", "--follow", "python etl.py verify --sample 100"),
    "batches": ("[env OPENAI_BASE_URL]", "--workers", "python etl.py batches cancel"),
    "db": ("[env ETL_PGDATA, default .pgdata]", "--table", "python etl.py db url"),
}


@pytest.mark.parametrize("verb", list(HELP))
def test_each_verbs_help_shows_its_own_settings_and_examples(verb, tmp_path):
    result = cli(*([verb] if verb else []), "--help", cwd=tmp_path, env=clean_env())
    assert result.returncode == 0
    text = result.stdout
    used, unused, example = HELP[verb]
    assert used in text and f"  {unused} " not in text and example in text
    others = [other for name, (_, _, other) in HELP.items() if name != verb]
    assert not any(other in text for other in others), "another verb's example"
    assert "exit codes:" in text and len(text.splitlines()) < 140


def test_a_flag_of_another_verb_is_refused_with_the_verbs_that_read_it(tmp_path):
    result = cli("status", "--workers", "2", cwd=tmp_path, env=clean_env())
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith(
        "unrecognized arguments: --workers 2 (--workers is read by run, demo, verify, serve, not by status)"
    )


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
