"""Azure OpenAI: the SDK's AzureOpenAI client on Azure's paths, key header, errors and rate-limit headers."""

import multiprocessing

import pytest

from embedfill.providers.openai import read_quota
from embedfill.ratelimit import BLIND_PAUSE, RateLimiter
from tests.conftest import check_table, env_for_table, make_foods
from tests.test_errors import null_count, one_line_error


@pytest.fixture
def azure_env(etl):
    etl.fake.azure_deployments = {"emb-small": "text-embedding-3-small"}
    return env_for_table(
        ETL_PROVIDER="azure",
        AZURE_OPENAI_ENDPOINT=etl.fake.base_url.removesuffix("/v1"),
        AZURE_OPENAI_API_KEY="test-key",
        OPENAI_API_VERSION="2024-10-21",
        AZURE_OPENAI_DEPLOYMENT="emb-small",
        EMBEDDING_DIMENSIONS=8,
        OPENAI_API_KEY=None,
        OPENAI_BASE_URL=None,
    )


def test_every_row_right_through_azure(etl, db, azure_env):
    make_foods(db, 300)
    result = etl.run("--workers", "2", "--batch-size", "50", **azure_env)
    assert result.returncode == 0, result.stderr
    embedded, null = check_table(db)
    assert len(embedded) == 300 and null == []
    assert etl.fake.azure_requests == etl.fake.requests >= 6 and etl.fake.inputs == 300
    # priced as the model the deployment serves, not as an unknown model called "emb-small"
    with db.cursor() as cur:  # the model guard knows the column by the model and the Azure resource's host
        cur.execute("SELECT model, provider FROM etl_columns")
        assert cur.fetchall() == [("text-embedding-3-small", etl.fake.host)]
    summary = dict(pair.split("=") for pair in result.stdout.split()[1:])
    assert summary["cost_usd"] == f"{int(summary['tokens']) * 0.02 / 1e6:.4f}" != "0.0000"


def test_azure_429_waits_retry_after_ms(etl, db, azure_env):
    make_foods(db, 40)
    etl.fake.add_faults({"status": 429, "headers": {"retry-after-ms": "1500", "retry-after": "2"}, "code": "429"})
    result = etl.run("--workers", "1", "--batch-size", "20", **azure_env)
    assert result.returncode == 0, result.stderr
    assert check_table(db)[1] == []
    arrivals = etl.fake.arrivals
    assert arrivals[1] - arrivals[0] >= 1.45  # no request, from any process, before the 429's retry-after-ms
    assert etl.fake.inputs == 40
    assert "rate_limited=1" in result.stdout


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            {"AZURE_OPENAI_DEPLOYMENT": "emb-smal"},
            "has no deployment emb-smal for api-version 2024-10-21 (404: The API",
        ),
        ({"OPENAI_API_VERSION": "2099-01-01"}, "for api-version 2099-01-01 (404: Resource not found)"),
        ({"AZURE_OPENAI_API_KEY": "wrong"}, "the API refused the key (401: Access denied"),
    ],
)
def test_azure_misconfiguration_is_one_line(etl, db, azure_env, override, expected):
    make_foods(db, 30)
    result = etl.run("--workers", "2", **{**azure_env, **override})
    assert result.returncode == 1
    line = one_line_error(result)
    assert expected in line
    assert ("AZURE_OPENAI_API_KEY" if "key" in expected else "OPENAI_API_VERSION") in line
    assert null_count(db) == 30


def test_an_endpoint_that_is_not_a_url_is_one_line(etl, db, azure_env):
    make_foods(db, 5)
    result = etl.run(**{**azure_env, "AZURE_OPENAI_ENDPOINT": "myres.openai.azure.com"})
    assert result.returncode == 1
    assert "AZURE_OPENAI_ENDPOINT='myres.openai.azure.com' is not a URL" in one_line_error(result)
    assert etl.fake.requests == 0 and null_count(db) == 5


def test_azure_settings_missing_before_any_request(etl, db, azure_env):
    make_foods(db, 5)
    result = etl.run(**{**azure_env, "OPENAI_API_VERSION": None, "AZURE_OPENAI_API_KEY": None})
    assert result.returncode == 1
    assert one_line_error(result) == (
        "error: AZURE_OPENAI_API_KEY and OPENAI_API_VERSION not set: "
        "Azure OpenAI needs its endpoint, key and API version"
    )
    assert etl.fake.requests == 0 and null_count(db) == 5


def test_remaining_quota_without_reset_pauses_the_workers():
    """Azure sends x-ratelimit-remaining-* without a limit or reset: a short remaining quota
    still pauses every worker, for BLIND_PAUSE."""
    limiter = RateLimiter(multiprocessing.get_context("fork"), workers=4)
    headers = {"x-ratelimit-remaining-requests": "10", "x-ratelimit-remaining-tokens": "9000"}
    assert limiter.observe(read_quota(headers), 100, 100) == 0
    assert limiter.observe(read_quota({"x-ratelimit-remaining-requests": "3"}), 100, 100) == BLIND_PAUSE
    assert limiter.cooldown_left() > BLIND_PAUSE - 0.1
    assert limiter.rates() == (None, None)  # no limit was learnt from headers that carry none
