"""Ollama's native embed API (ETL_PROVIDER=ollama): POST /api/embed on the fake, no key, floats in
input order, {"error": "..."} errors; every stored vector checked against its own text."""

import json
import socket
import subprocess
import sys

from tests.conftest import ROOT, check_table, env_for_table, expected_vector, make_foods
from tests.test_errors import null_count, one_line_error
from tests.test_guard import record


def run(etl, *args, **overrides):
    env = etl.env(**env_for_table(ETL_PROVIDER="ollama", OPENAI_API_KEY=None, EMBEDDING_MODEL="tiny-embed"))
    env.update(OPENAI_BASE_URL=etl.fake.base_url.removesuffix("/v1"))
    env.update({key: str(value) for key, value in overrides.items() if value is not None})
    for key in (key for key, value in overrides.items() if value is None):
        env.pop(key, None)
    command = [sys.executable, str(ROOT / "etl.py"), *args]
    return subprocess.run(command, cwd=etl.workdir, env=env, capture_output=True, text=True, timeout=120)


def summary(result):
    line = next(line for line in result.stdout.splitlines() if line.startswith("summary "))
    return dict(pair.split("=") for pair in line.split()[1:])


def test_a_run_fills_every_row_through_api_embed(etl, db):
    make_foods(db, 300)  # vector(8): tiny-embed's size, no `dimensions` needed
    etl.fake.add_faults({"status": 500}, {"drop": True})  # the server's problems: retried, no row blamed
    result = run(etl, "--workers", "2", "--batch-size", "25")
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert len(embedded) == 300 and null == []
    fake = etl.fake
    assert fake.ollama_requests == fake.requests >= 14 and fake.inputs == 300 and fake.auth_failures == 0
    assert fake.ollama_truncate == {True: fake.requests}  # the server may cut an input to its model's context
    numbers = summary(result)
    assert numbers["embedded"] == "300" and numbers["retries"] == "2"
    assert int(numbers["tokens"]) == fake.tokens_served > 0  # prompt_eval_count, summed
    # the model guard knows the column by the model and the Ollama server's host, never a key
    assert record(db) == [("tiny-embed", 8, etl.fake.host, ["name", "category", "description"], False)]

    embedded_one = run(etl, "embed", "김치찌개")  # the admin verbs go through the same provider
    assert embedded_one.returncode == 0, embedded_one.stderr
    answer = json.loads(embedded_one.stdout)
    assert answer["model"] == "tiny-embed" and answer["dimensions"] == 8
    assert max(abs(a - b) for a, b in zip(answer["embedding"], expected_vector("김치찌개", 8))) < 1e-6


def test_another_model_on_the_same_server_is_refused_before_any_request(etl, db):
    make_foods(db, 20)
    assert run(etl, "--limit", "10").returncode == 0
    requests = etl.fake.requests
    other = run(etl, EMBEDDING_MODEL="text-embedding-3-small", EMBEDDING_DIMENSIONS=8)
    assert other.returncode == 1
    assert "foods.embedding holds tiny-embed vectors; this run would add text-embedding-3-small ones" in (
        one_line_error(other)
    )
    assert etl.fake.requests == requests and null_count(db) == 10


def test_an_unknown_model_is_one_line(etl, db):
    make_foods(db, 30)
    result = run(etl, "--workers", "2", EMBEDDING_MODEL="nomic-embed-text")
    assert result.returncode == 1
    assert one_line_error(result) == (
        f"error: model nomic-embed-text was not found at {etl.fake.base_url.removesuffix('/v1')} "
        '(404: model "nomic-embed-text" not found, try pulling it first); '
        "pull it on the server (ollama pull nomic-embed-text) or check EMBEDDING_MODEL"
    )
    assert null_count(db) == 30 and etl.fake.statuses[200] == 0


def test_a_refused_input_is_isolated_and_recorded_alone(etl, db):
    texts = [(f"dish {n}", "stew", "POISON" if n in (7, 42) else f"about {n}") for n in range(1, 61)]
    make_foods(db, 60, texts=texts)
    result = run(etl, "--workers", "2", "--batch-size", "20")
    assert result.returncode == 3, result.stderr
    embedded, null = check_table(db)
    assert len(embedded) == 58 and sorted(null) == ["42", "7"]
    with db.cursor() as cur:
        cur.execute("SELECT row_id, reason FROM etl_failures ORDER BY row_id")
        assert cur.fetchall() == [
            ("42", "refused by the API: 400: Invalid input: the input contains refused content"),
            ("7", "refused by the API: 400: Invalid input: the input contains refused content"),
        ]


def test_no_truncate_lets_the_server_refuse_an_input_over_its_context(etl, db):
    long = " ".join(f"word{n}" for n in range(200))
    make_foods(db, 10, texts=[(f"dish {n}", "stew", long if n == 3 else "short") for n in range(1, 11)])
    etl.fake.max_input_tokens = 100  # the model's context, in the server's counting
    result = run(etl, "--no-truncate", "--batch-size", "10")
    assert result.returncode == 3, result.stderr
    assert etl.fake.ollama_truncate[False] == etl.fake.requests and etl.fake.ollama_truncate[True] == 0
    assert check_table(db)[1] == ["3"]
    with db.cursor() as cur:
        cur.execute("SELECT reason FROM etl_failures")
        assert cur.fetchall() == [("refused by the API: 400: the input length exceeds the context length",)]


def test_a_server_that_is_not_there_stops_the_run_naming_the_setting(etl, db):
    make_foods(db, 10)
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = run(etl, "--workers", "1", OPENAI_BASE_URL=f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith(f"error: cannot connect to http://127.0.0.1:{port}: ") and "check OPENAI_BASE_URL" in line
    assert null_count(db) == 10
