"""Rate limits shared by all workers: a configured budget, and pacing from response headers."""

from tests.conftest import check_table, env_for_table, make_foods
from tests.fake_openai import FakeOpenAI


def fake_with_limits(**limits):
    return FakeOpenAI(burst_seconds=1.0, **limits).start()


def test_a_requests_per_minute_budget_is_shared_by_all_workers(etl, db):
    make_foods(db, 150)
    etl.fake.stop()
    etl.fake = fake_with_limits(requests_per_minute=900)  # 15/s, a bucket of one second
    try:
        result = etl.run(
            "--workers",
            "4",
            "--batch-size",
            "5",
            "--max-requests-per-minute",
            "900",
            **env_for_table(EMBEDDING_DIMENSIONS=8),
        )
        assert result.returncode == 0, result.stderr
        assert etl.fake.statuses[429] == 0  # four workers together stayed under the server's limit
        assert etl.fake.statuses[200] >= 30
    finally:
        etl.fake.stop()
    assert check_table(db)[1] == []


def test_a_tokens_per_minute_budget_is_shared_by_all_workers(etl, db):
    make_foods(db, 300)
    etl.fake.stop()
    etl.fake = fake_with_limits(tokens_per_minute=60_000)  # 1000 tokens/s
    try:
        result = etl.run(
            "--workers",
            "4",
            "--batch-size",
            "10",
            "--max-tokens-per-minute",
            "60000",
            **env_for_table(EMBEDDING_DIMENSIONS=8),
        )
        assert result.returncode == 0, result.stderr
        assert etl.fake.statuses[429] == 0
        assert etl.fake.tokens_served > 2000
    finally:
        etl.fake.stop()
    assert check_table(db)[1] == []


def test_rate_limit_headers_slow_the_workers_before_429s(etl, db):
    """No budget configured: the x-ratelimit-* headers alone keep a 429 storm away."""
    make_foods(db, 300)
    etl.fake.stop()
    etl.fake = fake_with_limits(tokens_per_minute=60_000)
    try:
        result = etl.run("--workers", "4", "--batch-size", "10", **env_for_table(EMBEDDING_DIMENSIONS=8))
        assert result.returncode == 0, result.stderr
        limited, served = etl.fake.statuses[429], etl.fake.statuses[200]
        assert served >= 30
        assert limited <= 0.05 * (limited + served), f"{limited} of {limited + served} requests got 429"
    finally:
        etl.fake.stop()
    assert check_table(db)[1] == []
