"""Any OpenAI-compatible /embeddings endpoint (OpenAI, vLLM, TEI, LM Studio, Ollama's /v1...),
through the official SDK, with OpenAI's models, limits, x-ratelimit-* headers and Batch API.

The SDK's own retries are off (max_retries=0): the worker's retry loop owns the whole budget
(--max-attempts) and shares 429 cool-downs across processes.
"""

import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import numpy as np
import pybase64  # SIMD base64: decoding a 1536-dim vector takes 1 µs instead of 19 µs

from ..errors import ConfigError, ProviderError, TransientProviderError
from .base import Answer, Embedding, ModelInfo, Provider, Quota, QuotaLeft, first_line, said

DEFAULT_MODEL = "text-embedding-3-small"
# Prices are OpenAI's list prices (standard tier) per million input tokens; override with
# ETL_PRICE_PER_MILLION_TOKENS for other providers or tiers.
KNOWN_MODELS = {
    "text-embedding-3-small": ModelInfo(1536, 8191, 0.02),
    "text-embedding-3-large": ModelInfo(3072, 8191, 0.13),
    "text-embedding-ada-002": ModelInfo(1536, 8191, 0.10),
}
BATCH_PRICE_FACTOR = 0.5  # OpenAI's Batch API bills every embedding model at half its list price
# Limits of one request to the OpenAI embeddings endpoint.
MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000


class OpenAIProvider(Provider):
    """POST {OPENAI_BASE_URL}/embeddings with base64 float32 vectors, read as raw bytes."""

    name = "openai"
    models = KNOWN_MODELS
    key_setting = "OPENAI_API_KEY"
    batch_endpoint: ClassVar[str | None] = "/v1/embeddings"
    max_inputs_per_request = MAX_INPUTS_PER_REQUEST
    max_tokens_per_request = MAX_TOKENS_PER_REQUEST

    def __init__(self, settings: Any, column_dimensions: int | None = None):
        endpoint = settings.base_url or "https://api.openai.com/v1"
        super().__init__(settings, column_dimensions, endpoint, settings.api_key or self.name)
        self.encoding = settings.encoding_format  # base64, or float (decode reads both)
        self.client: Any = None

    def check(self) -> None:
        if not self.settings.api_key:
            raise ConfigError(
                "OPENAI_API_KEY is not set: put it in config.env or the environment "
                "(or use --provider local for offline lexical embeddings)"
            )
        super().check()

    def request_body(self, texts: Sequence[str]) -> dict:
        body = {"input": list(texts), "model": self.model, "encoding_format": self.encoding}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        return {**body, **self.extra_body}

    def batch_line(self, custom_id: str, texts: Sequence[str]) -> dict | None:
        if self.batch_endpoint is None:
            return None
        return {"custom_id": custom_id, "method": "POST", "url": self.batch_endpoint, "body": self.request_body(texts)}

    def quota(self, headers: Mapping[str, str]) -> Quota:
        return read_quota(headers)

    # --- the client --------------------------------------------------------------------------------
    def open(self) -> "OpenAIProvider":
        import httpx2
        import openai

        self._openai = openai
        self._raw_response = httpx2.Response  # as cast_to: the SDK hands back the HTTP response untouched
        self.client = self.make_client(openai, {"max_retries": 0, "timeout": self.settings.request_timeout})
        return self

    def make_client(self, openai: Any, options: dict) -> Any:
        return openai.OpenAI(api_key=self.settings.api_key, base_url=self.endpoint, **options)

    def fetch(self, texts: Sequence[str]) -> Answer:
        openai = self._openai
        try:
            # The raw request the SDK documents ("Making custom/undocumented requests"): auth,
            # base URL, timeout and error types are the SDK's, but neither the typed parameter
            # transform (which walks every input string) nor the typed response objects: with
            # them a request of 200 inputs costs 5-8 ms more CPU. The JSON is read by `decode`.
            response = self.client.post("/embeddings", body=self.request_body(texts), cast_to=self._raw_response)
            return Answer(response.content, response.headers, len(texts))
        except openai.APIConnectionError as error:  # APITimeoutError included
            timed_out = str(error) if isinstance(error, openai.APITimeoutError) else None
            raise self.connection_error(error.__cause__ or error, timed_out) from error
        except openai.APIStatusError as error:
            raise self._wrap_status(error) from error
        except openai.APIResponseValidationError as error:
            raise TransientProviderError(f"malformed response: {type(error).__name__}: {error}") from error

    def decode(self, answer: Answer) -> Embedding:
        rows = _Rows(answer.count)
        try:
            # the body lives once, as text (33 MB at most)
            text, answer.body = cast(bytes, answer.body).decode("utf-8"), None
            payload = json.loads(text, object_hook=rows.take)
            del text
            return Embedding(rows.matrix_for(payload["data"]), _usage(payload), answer.headers)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TransientProviderError(f"malformed response: {type(error).__name__}: {error}") from error

    def _wrap_status(self, error: Any) -> ProviderError:
        message = first_line(said(getattr(error, "body", None)) or str(error).strip()) or type(error).__name__
        headers = error.response.headers if error.response is not None else None
        return self.status_error(error.status_code, message, headers, getattr(error, "code", None))


# --- what an answer's headers say of the quota -----------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's x-ratelimit-reset-* values ('1s', '6m0s', '120ms', '0.5') in seconds, or None."""
    try:
        return float(value or "")
    except (TypeError, ValueError):
        parts = _DURATION.findall(value or "")
    return sum(float(number) * _UNITS[unit] for number, unit in parts) if parts else None


def read_quota(headers: Mapping[str, str] | None) -> Quota:
    """x-ratelimit-{limit,remaining,reset}-{tokens,requests}: a kind is said only with its remaining
    quota (Azure often sends nothing else)."""
    headers = headers or {}
    quota = {}
    for kind in ("tokens", "requests"):
        try:
            limit = float(headers.get(f"x-ratelimit-limit-{kind}") or 0) or None
            remaining = float(headers.get(f"x-ratelimit-remaining-{kind}", ""))
        except (TypeError, ValueError, AttributeError):
            continue
        quota[kind] = QuotaLeft(limit, remaining, parse_reset(headers.get(f"x-ratelimit-reset-{kind}")))
    return quota


# --- reading an answer -------------------------------------------------------------------------------
class _Rows:
    """Decodes each embedding the moment the JSON parser has read its item, straight into the
    row of its `index` (never its position) in one matrix. The item is replaced by its index,
    so its base64 string is freed at once: a 2048 × 3072 answer never holds its 33 MB of
    strings all together."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.matrix: np.ndarray | None = None
        self.seen = np.zeros(count, dtype=bool)

    def take(self, item: dict[str, Any]) -> dict[str, Any] | int:
        if "embedding" not in item:
            return item  # the usage, the answer itself
        index = item.get("index")
        if not isinstance(index, int) or not 0 <= index < self.count or self.seen[index]:
            raise TransientProviderError(
                f"the API returned a bad or repeated index {index!r} (for {self.count} inputs)"
            )
        value = item["embedding"]
        try:
            vector = decode_vector(value)
        except (binascii.Error, ValueError, TypeError) as error:
            raise TransientProviderError(f"malformed response: embedding {index} cannot be read ({error})") from None
        if vector.ndim != 1:
            raise TransientProviderError(f"malformed response: embedding {index} is not a flat list of numbers")
        if self.matrix is None:
            self.matrix = np.empty((self.count, vector.shape[0]), dtype=np.float32)
        elif vector.shape[0] != self.matrix.shape[1]:
            raise TransientProviderError(
                f"the API returned vectors of different lengths ({self.matrix.shape[1]} and {vector.shape[0]})"
            )
        self.matrix[index] = vector
        self.seen[index] = True
        return index

    def matrix_for(self, data: Any) -> np.ndarray:
        """The matrix, once every input has its vector and `data` holds nothing else."""
        taken = int(self.seen.sum())
        if not isinstance(data, list) or len(data) != self.count or taken != self.count:
            raise TransientProviderError(
                f"the API returned {len(data) if isinstance(data, list) else 'no list of'} embeddings "
                f"for {self.count} inputs"
            )
        return cast(np.ndarray, self.matrix)  # set by the first vector taken; a request has at least one


def decode_vector(value: Any) -> np.ndarray:
    """One embedding as the API sends it: base64 of little-endian float32 (as asked), or floats
    (servers that ignore encoding_format)."""
    if not isinstance(value, str):
        return np.asarray(value, dtype=np.float32)
    try:
        return np.frombuffer(pybase64.b64decode(value, validate=True), dtype="<f4")
    except (binascii.Error, ValueError):  # line breaks or other characters the strict decoder refuses
        return np.frombuffer(pybase64.b64decode(value), dtype="<f4")


def _usage(payload: dict[str, Any]) -> int:
    usage = payload.get("usage") or {}
    try:
        return int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0
