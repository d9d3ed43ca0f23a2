"""`etl.py verify`: every stored vector still belongs to its row's text, or the row is named."""

import re
import time

import pytest

from tests.conftest import check_table, env_for_table, make_foods

ENV = env_for_table(EMBEDDING_DIMENSIONS=8)


def filled_foods(etl, db, rows=60):
    """foods, embedded by a run, with the trigger an application would have: an edit of the
    text clears the vector (so that the next run embeds it again)."""
    make_foods(db, rows)
    with db.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION clear_embedding() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.embedding := NULL; RETURN NEW; END $$"
        )
        cur.execute(
            "CREATE TRIGGER foods_text_changed BEFORE UPDATE OF name, category, description ON foods "
            "FOR EACH ROW EXECUTE FUNCTION clear_embedding()"
        )
    result = etl.run("--workers", "2", **ENV)
    assert result.returncode == 0, result.stderr


def edit_behind_the_tools_back(db, row_id, name):
    with db.cursor() as cur:
        cur.execute("ALTER TABLE foods DISABLE TRIGGER foods_text_changed")
        cur.execute("UPDATE foods SET name = %s WHERE id = %s", (name, row_id))
        cur.execute("ALTER TABLE foods ENABLE TRIGGER foods_text_changed")


def vectors(db):
    with db.cursor() as cur:
        cur.execute("SELECT id, embedding::text FROM foods ORDER BY id")
        return dict(cur.fetchall())


def mismatch_lines(stdout):
    return sorted(line for line in stdout.splitlines() if line.startswith("row "))


SWAPPED_AND_EDITED = [
    "row 2: holds the vector of row 5's text",
    "row 5: holds the vector of row 2's text",
    "row 9: not its text's vector (text edited since, or another model)",
]


def test_verify_passes_then_names_swapped_and_edited_rows_and_fix_lets_a_run_repair_them(etl, db):
    filled_foods(etl, db)
    inputs = etl.fake.inputs
    right = etl.run("verify", **ENV)
    assert right.returncode == 0, right.stderr
    assert re.search(r"^verify checked=60 mismatched=0 unchecked=0 tokens=[1-9]\d* cost_usd=0\.\d{4} ", right.stdout)
    assert mismatch_lines(right.stdout) == []
    assert etl.fake.inputs == inputs + 60

    with db.cursor() as cur:  # two rows' vectors swapped, one text edited with the trigger off
        cur.execute("UPDATE foods f SET embedding = o.embedding FROM foods o WHERE (f.id, o.id) IN ((2, 5), (5, 2))")
    edit_behind_the_tools_back(db, 9, "edited food 9")
    before = vectors(db)

    for args in ([], ["--all", "--batch-size", "7", "--workers", "3"]):
        wrong = etl.run("verify", *args, **ENV)
        assert wrong.returncode == 3, wrong.stdout + wrong.stderr
        assert mismatch_lines(wrong.stdout) == SWAPPED_AND_EDITED
        assert "verify checked=60 mismatched=3 unchecked=0 " in wrong.stdout
        assert vectors(db) == before  # verify alone writes nothing

    fixed = etl.run("verify", "--all", "--fix", **ENV)
    assert fixed.returncode == 3, fixed.stderr
    assert mismatch_lines(fixed.stdout) == SWAPPED_AND_EDITED
    assert "fixed: 3 rows set to NULL; run `python etl.py` to embed them again" in fixed.stdout
    after = vectors(db)
    assert [row_id for row_id in after if after[row_id] is None] == [2, 5, 9]
    assert {k: v for k, v in after.items() if k not in (2, 5, 9)} == {
        k: v for k, v in before.items() if k not in (2, 5, 9)
    }

    inputs = etl.fake.inputs
    run = etl.run(**ENV)
    assert run.returncode == 0, run.stderr
    assert "summary embedded=3 failed=0" in run.stdout and etl.fake.inputs == inputs + 3
    embedded, null = check_table(db)
    assert len(embedded) == 60 and null == []
    again = etl.run("verify", "--all", **ENV)
    assert again.returncode == 0 and "verify checked=60 mismatched=0 " in again.stdout


def test_a_copied_vector_is_traced_to_its_row_and_a_refused_text_is_not_checked(etl, db):
    """Row 3 got a copy of row 7's vector (row 7 is right): found among row 3's stored neighbours,
    whose texts are embedded. A text the API refuses cannot be checked: named, exit 3."""
    filled_foods(etl, db)
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = (SELECT embedding FROM foods WHERE id = 7) WHERE id = 3")
    edit_behind_the_tools_back(db, 11, "POISON food")
    result = etl.run("verify", "--all", "--batch-size", "25", **ENV)
    assert result.returncode == 3, result.stderr
    assert mismatch_lines(result.stdout) == [
        "row 11: not checked: refused by the API: 400: Invalid input: the input contains refused content",
        "row 3: holds the vector of row 7's text",
    ]
    assert "verify checked=59 mismatched=1 unchecked=1 " in result.stdout
    # the run, the check of row 7, then the search among row 3's neighbours
    assert etl.fake.texts["food 7\ncategory 6\ndescription of 7"] == 3


@pytest.mark.parametrize("args, rows", [(["--all"], 60), (["--sample", "10"], 10)])
def test_verify_dry_run_prices_it_without_a_request(etl, db, args, rows):
    filled_foods(etl, db)
    requests = etl.fake.requests
    result = etl.run("verify", "--dry-run", *args, **ENV)
    assert result.returncode == 0, result.stderr
    match = re.search(
        rf"^verify dry-run table=foods rows={rows} estimated_tokens=(\d+) estimated_cost_usd=0\.\d{{4}} "
        r"model=text-embedding-3-small workers=4 batch_size=20",
        result.stdout,
    )
    assert match and int(match.group(1)) > 0, result.stdout
    assert etl.fake.requests == requests


def test_verify_help_and_a_bad_key(etl, db):
    filled_foods(etl, db, rows=10)
    help_text = etl.run("verify", "--help").stdout
    assert "--sample" in help_text and "--all" in help_text and "--fix" in help_text
    result = etl.run("verify", OPENAI_API_KEY="wrong", **ENV)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the API refused the key (401: Incorrect API key provided); check OPENAI_API_KEY"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_fatal_answer_while_another_page_backs_off_is_the_error_verify_reports(etl, db):
    filled_foods(etl, db, rows=60)
    etl.fake.add_faults(
        {"status": 500, "headers": {"retry-after": "3"}},
        {"status": 404, "code": "model_not_found", "message": "The model does not exist"},
    )
    result = etl.run("verify", "--workers", "2", "--batch-size", "10", **ENV)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: model text-embedding-3-small was not found at "), (
        result.stderr
    )
    assert result.stdout == ""


def test_sigterm_ends_verify_and_its_processes(etl, db):
    import psutil

    filled_foods(etl, db, rows=40)
    etl.fake.latency = 5.0
    process = etl.start("verify", "--all", "--batch-size", "5", "--workers", "2", **ENV)
    deadline = time.monotonic() + 30
    while etl.fake.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(process.pid).children(recursive=True)
    assert len(children) >= 2
    process.terminate()
    out, err = process.communicate(timeout=10)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert "verify checked=" not in out
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
