"""Break-it review of issue 22 (shape.py, requester's lessons, extra_body, encoding_format): each
test fails on 48c7932 and passes once the defect it names is fixed."""

import json
import math
import string

import pytest

from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import _encoding, _error, expected_vector
from tests.test_errors import one_line_error
from tests.test_servers_shape import again, rows

DIMS = {"EMBEDDING_DIMENSIONS": 8}
FAST_BATCH = ("--batch-api", "--poll-seconds", "0.1", "--batch-size", "20")


def serve(fake, refuse):
    """Put `refuse(body) -> (status, message) | None` in front of the fake's /embeddings; returns a
    list that counts the requests it refused."""
    original, refused = fake.handle, []

    def handle(headers, body, azure=None, via_batch=False, keyless=False):
        answer = None if via_batch else refuse(body)
        if answer is not None:
            refused.append(len(body.get("input") or []))
            status, message = answer
            fake._count_status(status)
            return status, {}, _error(message), 0
        return original(headers, body, azure, via_batch, keyless)

    fake.handle = handle
    return refused


# --- lesson(): numbers that are not the limit --------------------------------------------------------------


def test_voyage_tokens_per_batch_refusal_is_not_read_as_three_inputs_a_request():
    """Voyage's real refusal (see e.g. sigoden/aichat#825, ramakay/claude-self-reflect#38): the '3' of the
    model's name became max_inputs=3, kept in etl_limits for every later run."""
    from embedfill.lessons import lesson

    message = (
        "Request to model 'voyage-3-large' failed. The max allowed tokens per submitted batch is 120000. "
        "Your batch has 124302 tokens after truncation. Please lower the number of tokens in the batch."
    )
    assert lesson(400, message, 128) == ("max_tokens", 120000)


def test_a_proxys_413_status_line_is_not_read_as_its_limit():
    """'413 Request Entity Too Large' (a proxy's one-line body) for 512 inputs taught max_inputs=413:
    the status code itself taken as the limit."""
    from embedfill.lessons import lesson

    assert lesson(413, "413 Request Entity Too Large", 512) == ("fewer_inputs", 256)


# --- lessons that never end, or that end in a failure cutting would have avoided -------------------------


def test_one_input_over_the_servers_tokens_a_request_does_not_recurse_forever(etl, db):
    """A single row whose tokens exceed the `max_tokens` a request the server names: _learn returns True
    (sum > limit), _send packs the same lone row again, the same refusal... until RecursionError."""
    long_text = " ".join(f"word{i}" for i in range(200))  # ~400 tokens
    texts = [(f"dish {i}", "cat", long_text if i == 7 else None) for i in range(1, 21)]
    make_foods(db, 0, ids=range(1, 21), texts=texts)
    encoding = _encoding()

    def refuse(body):
        tokens = sum(len(encoding.encode_ordinary(text)) for text in body["input"])
        if tokens > 200:
            return 400, f"Too many tokens in batch. Max is 200 got {tokens}"  # Mistral's words
        return None

    refused = serve(etl.fake, refuse)
    result = etl.run(
        "--workers", "1", "--batch-size", "20", timeout=60, **env_for_table(EMBEDDING_MODEL="tiny-embed", **DIMS)
    )
    assert len(refused) < 20, f"{len(refused)} refusals for one row; {result.stderr[-600:]}"
    assert result.returncode == 3, result.stderr  # the one row recorded, the others written
    assert rows(db, "SELECT row_id FROM etl_failures") == [("7",)]
    assert len(check_table(db)[0]) == 19


def test_a_context_refusal_still_cuts_when_the_servers_tokenizer_counts_more_than_cl100k(etl, db):
    """The server's tokenizer counts 1.5x cl100k (a BERT vocabulary on numbers, say) and takes 100 tokens an
    input. The first refusal teaches 100 and cuts to 100 by cl100k; the row (70 by cl100k, 105 by the server)
    is refused again, and since 70 <= int(100 * 0.8) `_learn` gives up: the row is recorded as refused
    although cutting it further would have been enough (the docstring's 'cut further')."""
    encoding = _encoding()
    long_text = " ".join(f"word{i}" for i in range(33))
    ours = len(encoding.encode_ordinary(f"dish 7\ncat\n{long_text}"))
    assert 67 <= ours <= 80 and math.ceil(1.5 * ours) > 100  # the case: under 0.8 x 100 for us, over 100 for it
    texts = [(f"dish {i}", "cat", long_text if i == 7 else None) for i in range(1, 21)]
    make_foods(db, 0, ids=range(1, 21), texts=texts)
    etl.fake.max_input_tokens = 100
    etl.fake.count_tokens = lambda text: math.ceil(1.5 * len(encoding.encode_ordinary(text)))
    result = etl.run("--workers", "1", "--batch-size", "20", **env_for_table(EMBEDDING_MODEL="tiny-embed", **DIMS))
    assert result.returncode == 0, result.stderr
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert rows(db, "SELECT count(*) FROM foods WHERE embedding IS NULL") == [(0,)]


# --- what is kept in etl_limits ----------------------------------------------------------------------------


def test_a_server_that_answers_413_to_everything_stops_the_run_and_teaches_nothing(etl, db):
    """Every request, even of one input, answered 413: the halving 'lessons' go down to max_inputs=1, the
    run stops, and max_inputs=1 is kept for this endpoint and model: every later run (the proxy fixed)
    sends one input a request, forever. Nothing succeeded, so nothing was learned."""
    make_foods(db, 64)
    etl.fake.add_faults(*[{"status": 413, "message": "Request Entity Too Large"}] * 5000)
    result = etl.run("--workers", "1", "--batch-size", "64", **env_for_table(**DIMS))
    assert result.returncode == 1, result.stderr
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert rows(db, "SELECT max_inputs FROM etl_limits") in ([], [(None,)])
    # Each process (at least four) halves its batch down to single inputs, then stops after its batch's rows
    # were each refused alone with nothing answered: each row once alone, plus the halvings; never more.
    assert etl.fake.statuses[413] <= 64 + 4 * 6


def test_a_one_off_413_without_a_stated_limit_is_not_kept_as_the_servers_limit(etl, db):
    """A single 413 with no number (a proxy's body limit hit once) makes the run halve its requests: a
    guess, not what the server said. It is kept as max_inputs in etl_limits and only ever lowered (least()),
    so the next run, against a server that takes the whole batch, is capped at the guess; nothing but a
    DELETE FROM etl_limits by hand undoes it."""
    make_foods(db, 256)
    etl.fake.add_faults({"status": 413, "message": "Request Entity Too Large"})
    result = etl.run("--workers", "1", "--batch-size", "64", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    again(db)
    etl.fake.reset_counters()
    result = etl.run("--workers", "1", "--batch-size", "64", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert max(etl.fake.batch_sizes) == 64, f"the second run is capped at {max(etl.fake.batch_sizes)} inputs"


# --- extra_body ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ['{"input": "hello"}', '{"model": "text-embedding-3-large"}', '{"dimensions": 16}'])
def test_extra_body_cannot_replace_the_input_or_the_model(etl, db, extra):
    """request_body is {**body, **extra_body}: `input` replaced means every row gets the vector of "hello";
    `model` replaced means vectors of another model recorded as EMBEDDING_MODEL's; `dimensions` replaced
    means the width error blames the server ('ignored `dimensions`') for what the extra body asked."""
    make_foods(db, 3)
    result = etl.run("--batch-size", "1", "--extra-body", extra, **env_for_table(**DIMS))
    hello = expected_vector("hello", 8).tolist()
    written = rows(db, "SELECT embedding::text FROM foods WHERE embedding IS NOT NULL")
    wrong = [v for (v,) in written if all(abs(float(x) - y) < 1e-5 for x, y in zip(v.strip("[]").split(","), hello))]
    assert wrong == [], f"{len(wrong)} rows hold the vector of 'hello'"
    assert result.returncode == 2, result.stderr  # refused as a usage error, before any request
    assert etl.fake.requests == 0


def test_a_refused_extra_field_names_extra_body_not_the_model_and_dimensions(etl, db):
    """OpenAI's answer to a field it does not know: the run stops, telling the user to check
    EMBEDDING_MODEL and EMBEDDING_DIMENSIONS, which are right; the field at fault is EMBEDDING_EXTRA_BODY's."""
    make_foods(db, 40)
    serve(etl.fake, lambda body: (400, "Unrecognized request argument supplied: input_type") if "input_type" in body
          else None)  # fmt: skip
    result = etl.run("--extra-body", '{"input_type": "document"}', **env_for_table(**DIMS))
    assert result.returncode == 1, result.stderr
    assert "EMBEDDING_EXTRA_BODY" in one_line_error(result)


def test_a_secret_in_extra_body_is_not_printed(etl, db):
    """extra_body goes into the guard's messages verbatim ("asked with {...}") and nothing adds its values to
    the redacted secrets: a key-looking field (a gateway's api_key, say) is printed in the clear."""
    make_foods(db, 20)
    secret = "sk-gateway-5f9c2e71d0a84b36"
    result = etl.run("--extra-body", json.dumps({"api_key": secret}), **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    again(db)
    result = etl.run(**env_for_table(**DIMS))  # the guard refuses: another extra body
    assert result.returncode == 1
    assert secret not in result.stderr, one_line_error(result)


# --- the paths that do not read the Shape --------------------------------------------------------------------


def test_search_works_on_a_database_no_run_of_this_tool_has_migrated(etl, db):
    """A read-only verb on a column filled by another tool (or by a tool before schema 3): column_record
    knows to return None, but query_vector then reads etl_limits, which is not there: a database error."""
    make_foods(db, 5)
    with db.cursor() as cur:
        for row_id in range(1, 6):
            text = f"food {row_id}\ncategory {(row_id - 1) % 7}\ndescription of {row_id}"
            cur.execute("UPDATE foods SET embedding = %s::vector WHERE id = %s",
                        (str(expected_vector(text, 8).tolist()), row_id))  # fmt: skip
    result = etl.run("search", "food 1", "--top", "1", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert "food " in result.stdout


def test_defer_index_probe_asks_as_the_runs_learned(etl, db):
    """etl_limits says this server refuses base64 (learned by the first run); the --defer-index probe
    (indexes._probe) builds its own embedder and never follows the Shape: 400 base64, the run stops."""
    make_foods(db, 100)
    etl.fake.refuse_base64 = True  # older vLLM
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert rows(db, "SELECT floats FROM etl_limits") == [(True,)]
    again(db)
    with db.cursor() as cur:
        cur.execute("CREATE INDEX foods_hnsw ON foods USING hnsw (embedding vector_cosine_ops)")
    result = etl.run("--defer-index", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert len(check_table(db)[0]) == 100


def test_batch_api_lines_ask_as_the_runs_learned(etl, db):
    """etl_limits says this endpoint refuses base64: --batch-api still writes every request line with
    encoding_format=base64 (BatchRun.provider never reads the Shape), every line is refused, and every row
    goes again through the normal endpoint at twice the price."""
    make_foods(db, 60)
    etl.fake.refuse_base64 = True
    result = etl.run(**env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    again(db)
    etl.fake.reset_counters()
    result = etl.run(*FAST_BATCH, **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert len(check_table(db)[0]) == 60
    assert etl.fake.batch_inputs == 60 and etl.fake.inputs == 0, (etl.fake.batch_inputs, etl.fake.inputs)


# --- usage -----------------------------------------------------------------------------------------------------


def test_usage_in_tokens_equal_to_the_characters_is_not_taken_for_characters(etl, db):
    """Short codes ('A1', 'B7': two tokens, two characters each) from a server whose usage is right: usage ==
    characters flags it as 'not in tokens', says so, and keeps own_usage for this endpoint for every run."""
    codes = [f"{letter}{digit}" for letter in string.ascii_uppercase for digit in "0123456789"][:120]
    make_foods(db, 0, ids=range(1, 121), texts=[(code, None, None) for code in codes])
    result = etl.run("--workers", "1", "--batch-size", "40", **env_for_table(**DIMS))
    assert result.returncode == 0, result.stderr
    assert "the server's usage is not in tokens" not in result.stderr
    assert rows(db, "SELECT own_usage FROM etl_limits") in ([], [(False,)])
