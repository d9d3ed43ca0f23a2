"""A row is blamed only for itself: a server that cannot be reached, restarts, is slow or refuses
everything never puts a row into etl_failures, and a run that wrote nothing leaves no record."""

import socket
import time

from tests.conftest import check_table, env_for_table, make_foods
from tests.test_errors import one_line_error

DIMS = {"EMBEDDING_DIMENSIONS": 8}


def rows(db, query):
    with db.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_endpoint_that_cannot_be_reached_stops_the_run_naming_the_setting(etl, db):
    make_foods(db, 200)
    for url in (f"http://127.0.0.1:{free_port()}/v1", "http://no-such-host.invalid/v1"):
        started = time.monotonic()
        result = etl.run("--workers", "4", "--batch-size", "20", OPENAI_BASE_URL=url, **env_for_table(**DIMS))
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - started < 15
        error = one_line_error(result)
        assert error.startswith(f"error: cannot connect to {url}: "), error
        assert error.endswith("; check OPENAI_BASE_URL (and the network): no request of this run has reached the API")
        assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
        assert rows(db, "SELECT count(*) FROM etl_columns") == [(0,)]  # it wrote nothing: no record
    result = etl.run(**env_for_table(EMBEDDING_MODEL="text-embedding-3-large", **DIMS))  # the guard has nothing to hold
    assert result.returncode == 0, result.stderr
    assert len(check_table(db)[0]) == 200


def test_a_server_restarted_mid_run_fails_no_row(etl, db):
    make_foods(db, 600)
    etl.fake.latency = 0.05
    run = etl.start("--workers", "2", "--batch-size", "10", "--max-attempts", "3", **env_for_table(**DIMS))
    deadline = time.monotonic() + 30
    while etl.fake.inputs < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    etl.fake.restart(8)  # down 8 s: longer than 3 attempts' back-off
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 600
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert "summary embedded=600 failed=0" in out


def test_timeouts_make_the_requests_smaller_for_every_worker(etl, db):
    make_foods(db, 128)
    etl.fake.seconds_per_input = 0.04  # 64 inputs: 2.6 s, 32: 1.3 s, 16: 0.6 s
    result = etl.run(
        "--workers", "2", "--batch-size", "64", "--request-timeout", "1", **env_for_table(**DIMS), timeout=60
    )
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert null == [] and len(embedded) == 128
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert "requests carry at most 16 inputs from now on" in result.stderr
    sizes = etl.fake.batch_sizes  # every request the server saw, answered in time or not
    assert sizes.count(64) <= 2 and sizes.count(32) <= 2  # the first of each worker, then the cap
    assert sizes.count(16) == 128 // 16 and set(sizes) == {64, 32, 16}


def test_refused_rows_at_the_start_of_a_range_are_recorded_and_the_rest_embedded(etl, db):
    texts = [("POISON dish" if i <= 3 else f"dish {i}", "cat", None) for i in range(1, 21)]
    make_foods(db, 0, ids=range(1, 21), texts=texts)
    result = etl.run("--workers", "1", "--batch-size", "20", **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    assert [row_id for (row_id,) in rows(db, "SELECT row_id FROM etl_failures ORDER BY row_id::int")] == ["1", "2", "3"]
    embedded, null = check_table(db)
    assert sorted(null) == ["1", "2", "3"] and len(embedded) == 17
    again = etl.run(**env_for_table(**DIMS))
    assert again.returncode == 0, again.stderr  # the table can be finished: the rest is done


def test_an_api_that_refuses_every_input_stops_the_run_and_records_nothing(etl, db):
    make_foods(db, 60)
    etl.fake.refuse_marker = "food"  # in every text: as if the model refused the request's settings
    result = etl.run("--workers", "2", "--batch-size", "20", **env_for_table(**DIMS))
    assert result.returncode == 1, result.stderr
    error = one_line_error(result)
    assert error.startswith("error: the API refuses every input (refused by the API: 400: Invalid input")
    assert error.endswith("check EMBEDDING_MODEL and EMBEDDING_DIMENSIONS")
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(0,)]
    assert rows(db, "SELECT count(*) FROM etl_columns") == [(0,)]


def test_a_row_the_server_fails_on_while_it_answers_others_is_recorded(etl, db):
    """A 500 for one input only (a server that crashes on it), while the others are answered: that
    row, isolated, is the one at fault."""
    make_foods(db, 40)
    original = etl.fake.handle

    def fails_on_row_7(headers, body, azure=None, via_batch=False):
        if "food 7\ncategory 6\ndescription of 7" in (body.get("input") or []):
            etl.fake._count_status(500)
            return 500, {}, {"error": {"message": "worker crashed", "type": "server_error"}}, 0
        return original(headers, body, azure, via_batch)

    etl.fake.handle = fails_on_row_7
    result = etl.run("--workers", "1", "--batch-size", "20", "--max-attempts", "2", **env_for_table(**DIMS))
    assert result.returncode == 3, result.stderr
    (reason,) = [reason for row_id, reason in rows(db, "SELECT row_id, reason FROM etl_failures") if row_id == "7"]
    assert reason.startswith("the server fails on this input (3 attempts) but answers others: server error (500")
    assert rows(db, "SELECT count(*) FROM etl_failures") == [(1,)]
    assert len(check_table(db)[0]) == 39
