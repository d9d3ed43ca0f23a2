"""Embedding providers behind one interface: `embed(texts) -> Embedding` (= `decode(fetch(texts))`).

The worker never knows which provider it has. Provider errors are wrapped here, once, into
the project's own exception types (errors.py), which say whether to retry, split or stop.
"""

import binascii
import json
import logging
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import numpy as np
import pybase64  # SIMD base64: decoding a 1536-dim vector takes 1 µs instead of 19 µs

from .errors import ConfigError, FatalProviderError, InvalidInputError, TransientProviderError
from .models import LOCAL_DEFAULT_DIMENSIONS

log = logging.getLogger(__name__)


@dataclass
class Embedding:
    """The vectors of one request, row i for input i, plus what the provider reported."""

    vectors: np.ndarray
    tokens: int
    headers: dict


@dataclass
class Answer:
    """A provider's answer as received: read, not yet decoded (`decode` takes its body away)."""

    body: bytes | None
    headers: dict
    count: int


class Embedder:
    """The interface: turn a list of non-empty texts into a float32 matrix, in input order.

    `embed` is `decode(fetch(texts))`. A worker calls `fetch` while it holds a request slot
    and `decode` after letting go of it, so another worker's request goes out as soon as an
    answer's bytes are in."""

    def embed(self, texts):
        return self.decode(self.fetch(texts))

    def fetch(self, texts):
        raise NotImplementedError

    def decode(self, answer):
        return answer

    def close(self):
        pass


def make_embedder(settings, column_dimensions=None):
    """The provider the settings ask for (created inside the process that uses it).

    The local provider makes vectors of any size: EMBEDDING_DIMENSIONS, else the column's."""
    if settings.provider == "local":
        return LocalEmbedder(settings.dimensions or column_dimensions or LOCAL_DEFAULT_DIMENSIONS)
    check_provider(settings)
    return OpenAIEmbedder(settings)


def load_client_library():
    """Import the SDK: the parent does it before forking the workers, which share its pages
    instead of each spending half a second of CPU on it."""
    import httpx2  # noqa: F401 - the SDK's HTTP library
    import openai  # noqa: F401


def check_provider(settings):
    """The settings the OpenAI-compatible provider cannot do without."""
    if settings.provider == "openai" and not settings.api_key:
        raise ConfigError(
            "OPENAI_API_KEY is not set: put it in config.env or the environment "
            "(or use --provider local for offline lexical embeddings)"
        )
    if settings.provider == "azure":
        needed = {"AZURE_OPENAI_ENDPOINT": settings.azure_endpoint, "AZURE_OPENAI_API_KEY": settings.azure_api_key}
        missing = [name for name, value in {**needed, "OPENAI_API_VERSION": settings.api_version}.items() if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set: Azure OpenAI needs its endpoint, key and API version")
    for name, url in (("AZURE_OPENAI_ENDPOINT", settings.azure_endpoint), ("OPENAI_BASE_URL", settings.base_url)):
        parts = urlsplit(url or "http://x")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{name}={url!r} is not a URL: write it as https://HOST (e.g. https://NAME.openai.azure.com)"
            )


def retry_after_seconds(headers):
    """Seconds the server asked us to wait (retry-after-ms, or retry-after in seconds or as a date), or None."""
    headers = headers or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            pass
    try:
        when = parsedate_to_datetime(headers.get("retry-after"))
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_reset(value):
    """OpenAI's x-ratelimit-reset-* values ('1s', '6m0s', '120ms', '0.5') in seconds, or None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        parts = _DURATION.findall(value or "")
    return sum(float(number) * _UNITS[unit] for number, unit in parts) if parts else None


class OpenAIEmbedder(Embedder):
    """Any OpenAI-compatible /embeddings endpoint, through the official SDK.

    The SDK's own retries are off (max_retries=0): the worker's retry loop owns the whole
    budget (--max-attempts) and shares 429 cool-downs across processes.
    """

    def __init__(self, settings):
        import httpx2
        import openai

        self._openai = openai
        self._raw_response = httpx2.Response  # as cast_to: the SDK hands back the HTTP response untouched
        self.dimensions = settings.dimensions
        self.azure, self.api_version = settings.provider == "azure", settings.api_version
        options = {"max_retries": 0, "timeout": settings.request_timeout}
        if self.azure:  # the SDK puts the model (here: the deployment) into the path, and api-version in the query
            self.model, self.base_url = settings.deployment or settings.model, settings.azure_endpoint
            self.client = openai.AzureOpenAI(
                azure_endpoint=self.base_url,
                api_key=settings.azure_api_key,
                api_version=settings.api_version,
                **options,
            )
        else:
            self.model, self.base_url = settings.model, settings.base_url or "https://api.openai.com/v1"
            self.client = openai.OpenAI(api_key=settings.api_key, base_url=self.base_url, **options)

    def fetch(self, texts):
        """Send one request and read its answer's bytes (the part that needs the connection)."""
        openai = self._openai
        body = {"input": list(texts), "model": self.model, "encoding_format": "base64"}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        try:
            # The raw request the SDK documents ("Making custom/undocumented requests"): auth,
            # base URL, timeout and error types are the SDK's, but neither the typed parameter
            # transform (which walks every input string) nor the typed response objects: with
            # them a request of 200 inputs costs 5-8 ms more CPU. The JSON is read by `decode`.
            response = self.client.post("/embeddings", body=body, cast_to=self._raw_response)
            return Answer(response.content, response.headers, len(texts))
        except openai.APIConnectionError as error:  # APITimeoutError included
            raise self._wrap_connection(error) from error
        except openai.APIStatusError as error:
            raise self._wrap_status(error) from error
        except openai.APIResponseValidationError as error:
            raise TransientProviderError(f"malformed response: {type(error).__name__}: {error}") from error

    def decode(self, answer):
        """The answer's vectors, row i for input i, and its usage (CPU only: no connection)."""
        rows = _Rows(answer.count)
        try:
            text, answer.body = answer.body.decode("utf-8"), None  # the body lives once, as text (33 MB at most)
            payload = json.loads(text, object_hook=rows.take)
            del text
            return Embedding(rows.matrix_for(payload["data"]), _usage(payload), answer.headers)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TransientProviderError(f"malformed response: {type(error).__name__}: {error}") from error

    def _wrap_connection(self, error):
        """No answer: a timeout, or no connection at all ("unreachable": refused, a name that does
        not resolve, a connect that timed out), or one dropped on the way."""
        import httpx2

        cause = error.__cause__ or error
        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            message = f"cannot connect to {self.base_url}: {_cause_text(cause)}"
            return TransientProviderError(message, kind="unreachable")
        if isinstance(error, self._openai.APITimeoutError):
            return TransientProviderError(f"request timed out ({error})", kind="timeout")
        return TransientProviderError(f"connection error: {type(cause).__name__}: {_cause_text(cause)}")

    def _wrap_status(self, error):
        status = error.status_code
        message = _api_message(error)
        headers = error.response.headers if error.response is not None else None
        if status in (401, 403):
            return FatalProviderError(
                f"the API refused the key ({status}: {message}); check "
                + ("AZURE_OPENAI_API_KEY" if self.azure else "OPENAI_API_KEY")
                + ("" if status == 401 else " and the key's access to the model")
            )
        if status == 404 and self.azure:
            return FatalProviderError(
                f"Azure OpenAI at {self.base_url} has no deployment {self.model} for api-version {self.api_version} "
                f"(404: {message}); check AZURE_OPENAI_DEPLOYMENT, OPENAI_API_VERSION and AZURE_OPENAI_ENDPOINT "
                "(the resource's URL, without /openai)"
            )
        if status == 404:
            return FatalProviderError(
                f"model {self.model} was not found at {self.base_url} (404: {message}); "
                "check EMBEDDING_MODEL and OPENAI_BASE_URL"
            )
        if status == 429:
            lowered = message.lower()
            if "insufficient_quota" in (getattr(error, "code", None) or "") or (
                "quota" in lowered and "exceeded" in lowered
            ):
                return FatalProviderError(f"the account's quota is used up (429: {message}); check billing")
            return TransientProviderError(
                f"rate limited (429: {message})", retry_after_seconds(headers), kind="rate_limited"
            )
        if status in (408, 409) or status >= 500:
            return TransientProviderError(f"server error ({status}: {message})", retry_after_seconds(headers))
        if status in (400, 413, 422):
            return InvalidInputError(f"{status}: {message}")
        return FatalProviderError(f"the API answered {status}: {message}")

    def close(self):
        self.client.close()


class _Rows:
    """Decodes each embedding the moment the JSON parser has read its item, straight into the
    row of its `index` (never its position) in one matrix. The item is replaced by its index,
    so its base64 string is freed at once: a 2048 × 3072 answer never holds its 33 MB of
    strings all together."""

    def __init__(self, count):
        self.count = count
        self.matrix = None
        self.seen = np.zeros(count, dtype=bool)

    def take(self, item):
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

    def matrix_for(self, data):
        """The matrix, once every input has its vector and `data` holds nothing else."""
        taken = int(self.seen.sum())
        if not isinstance(data, list) or len(data) != self.count or taken != self.count:
            raise TransientProviderError(
                f"the API returned {len(data) if isinstance(data, list) else 'no list of'} embeddings "
                f"for {self.count} inputs"
            )
        return self.matrix


def decode_vector(value):
    """One embedding as the API sends it: base64 of little-endian float32 (as asked), or floats
    (servers that ignore encoding_format)."""
    if not isinstance(value, str):
        return np.asarray(value, dtype=np.float32)
    try:
        return np.frombuffer(pybase64.b64decode(value, validate=True), dtype="<f4")
    except (binascii.Error, ValueError):  # line breaks or other characters the strict decoder refuses
        return np.frombuffer(pybase64.b64decode(value), dtype="<f4")


def _usage(payload):
    usage = payload.get("usage") or {}
    try:
        return int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def _api_message(error):
    """What the server said, whatever its shape: OpenAI's {"error": {"message"}}, TEI's
    {"error": "..."}, FastAPI's {"detail": "..." or [{"msg": ...}]}, {"message"}, or plain text."""
    said = _said(getattr(error, "body", None)) or str(error).strip() or type(error).__name__
    return said.splitlines()[0][:300]


def _said(body):
    if isinstance(body, str):
        return body.strip()
    if isinstance(body, list):
        return "; ".join(filter(None, (_said(item) for item in body)))
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "msg"):
            if body.get(key):
                return _said(body[key])
    return ""


def _cause_text(cause):
    """An httpx error's text, with the innermost OS error when it has one ('[Errno 111] Connection refused')."""
    while cause.__context__ is not None and not str(cause):
        cause = cause.__context__
    return str(cause) or type(cause).__name__


class LocalEmbedder(Embedder):
    """Offline lexical embeddings: feature hashing of character n-grams and words.

    Deterministic, any dimension, works for any script (Korean included). It captures
    spelling overlap, not meaning: "김치찌개" is near "김치전", not near "stew". It bills no
    tokens, so a run with it reports tokens=0.
    """

    def __init__(self, dimensions):
        self.dimensions = dimensions

    def fetch(self, texts):
        matrix = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            features = _features(text)
            hashes = np.fromiter(
                (zlib.crc32(f.encode("utf-8")) for f in features), dtype=np.uint64, count=len(features)
            )
            signs = np.where(hashes & (1 << 31), -1.0, 1.0).astype(np.float32)
            np.add.at(matrix[row], (hashes % self.dimensions).astype(np.intp), signs)
            norm = float(np.linalg.norm(matrix[row]))
            if norm > 0:
                matrix[row] /= norm
        return Embedding(matrix, 0, {})  # no API, no tokens billed


def _features(text):
    normalized = " ".join(text.lower().split())
    padded = f" {normalized} "
    grams = [padded[i : i + n] for n in (2, 3) for i in range(len(padded) - n + 1)]
    words = ["w:" + word for word in normalized.split()]
    return grams + words or ["<empty>"]
