"""The provider interface: everything the tool asks of an embeddings provider, in one small class.

A provider is made from the settings (cheap: no client, no SDK import) and answers what the rest
of the tool asks: what a request looks like, its limits, its identity for the model guard (the
host, never the key), its quota identity, what an answer says of the quota, its Batch API line.
`open()` builds its client (in the parent, before the fork: see worker.py), then
`embed(texts) = decode(fetch(texts))`: `fetch` holds the connection (a worker calls it while it
holds a request slot), `decode` is CPU only (after the slot is let go). Every error is wrapped
once into errors.py's types, which say whether to retry, split or stop.
"""

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from ..errors import ConfigError, FatalProviderError, InvalidInputError, ProviderError, TransientProviderError

DEFAULT_MAX_INPUT_TOKENS = 8191  # the longest input of a model the tool knows nothing of
# The context of common open models (served by vLLM, TEI, Infinity, Ollama...), by a part of their name.
OPEN_MODEL_CONTEXTS = (
    ("bge-m3", 8192), ("nomic-embed", 8192), ("jina-embeddings", 8192), ("gte-qwen", 8192), ("minilm", 256),
    ("mpnet", 384), ("e5-", 512), ("bge-", 512), ("gte-", 512), ("mxbai-embed", 512), ("snowflake-arctic-embed", 512),
)  # fmt: skip


@dataclass
class Embedding:
    """The vectors of one request, row i for input i, plus what the provider reported."""

    vectors: np.ndarray
    tokens: int  # as the provider reports them (0 when it reports none)
    headers: Mapping[str, str]


@dataclass
class Answer:
    """A provider's answer as received: read, not yet decoded (`decode` takes its body away)."""

    body: bytes | None
    headers: Mapping[str, str]
    count: int


@dataclass(frozen=True)
class ModelInfo:
    dimensions: int
    max_input_tokens: int
    usd_per_million_tokens: float


@dataclass(frozen=True)
class Limits:
    """What one request may carry (None: no limit known)."""

    max_inputs: int | None
    max_tokens: int | None  # all inputs of one request together
    max_input_tokens: int  # one input: the model's limit


@dataclass(frozen=True)
class QuotaLeft:
    """What an answer says of one kind of quota ("tokens" or "requests"); None: not said."""

    limit: float | None  # a minute
    remaining: float | None
    reset: float | None  # seconds until all of it is back


Quota = dict  # {"tokens": QuotaLeft, "requests": QuotaLeft}, each only when the answer says it


class Provider(ABC):
    """One embeddings provider. Subclasses set `name` (its ETL_PROVIDER value) and implement
    `request_body`, `fetch` and `decode`; the rest has defaults that fit most."""

    name: ClassVar[str]
    models: ClassVar[Mapping[str, ModelInfo]] = {}  # known models: dimensions, input limit, price
    url_setting: ClassVar[str] = "OPENAI_BASE_URL"  # the setting that says where it is
    key_setting: ClassVar[str | None] = None  # the setting that holds its key, if it takes one
    batch_endpoint: ClassVar[str | None] = None  # its Batch API's endpoint; None: it has none
    max_inputs_per_request: ClassVar[int | None] = None  # None: no limit known
    max_tokens_per_request: ClassVar[int | None] = None
    reports_usage: ClassVar[bool] = True  # its answers say the tokens billed (requester.py checks they are tokens)

    def __init__(self, settings: Any, column_dimensions: int | None = None, endpoint: str = "", secret: str = ""):
        self.settings = settings
        self.model = settings.model  # what a request names
        self.model_name = settings.model  # what the column records and the messages say
        self.dimensions = settings.dimensions  # sent as `dimensions` when set
        self.endpoint = endpoint  # where requests go (no secret in it)
        self._secret = secret or ""  # what quota_key hashes with the endpoint; never shown
        self.extra_body: dict = json.loads(settings.extra_body or "{}")  # fields added to every request body
        self.encoding: str | None = None  # the `encoding_format` asked for, when the provider sends one
        self.limits = Limits(
            self.max_inputs_per_request, self.max_tokens_per_request, settings.max_input_tokens or self.context()
        )

    # --- what it is ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError for a setting it cannot do without (before any request)."""
        check_url(self.url_setting, self.endpoint)

    @property
    def host(self) -> str:
        """Its identity for the model guard: the endpoint's host, and its port unless the scheme's own
        (two servers of one machine are two providers), never the key."""
        parts = urlsplit(self.endpoint)
        if not parts.hostname:
            return self.endpoint
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        default = {"http": 80, "https": 443}.get(parts.scheme)
        return host if parts.port in (None, default) else f"{host}:{parts.port}"

    @property
    def quota_key(self) -> str:
        """A hash of the endpoint and the key: runs that share a quota share it; nobody can read the key back."""
        return hashlib.sha256(f"{self.endpoint}\n{self._secret}".encode()).hexdigest()[:32]

    def model_info(self) -> ModelInfo | None:
        """The known facts about the model it serves, or None."""
        return self.models.get(self.model_name)

    def context(self) -> int:
        """The model's input limit in tokens: known, else a common open model's, else 8191."""
        return model_context(self.model_name, self.model_info())

    @property
    def output_dimensions(self) -> int | None:
        """The vectors' width as known before any request: the `dimensions` asked, else the model's."""
        info = self.model_info()
        return self.dimensions or (info.dimensions if info else None)

    # --- requests --------------------------------------------------------------------------------
    @abstractmethod
    def request_body(self, texts: Sequence[str]) -> dict:
        """The JSON body of one request for `texts`."""

    def open(self) -> "Provider":
        """Build the client (in the parent, before the fork; no connection is made yet). Returns self."""
        return self

    @abstractmethod
    def fetch(self, texts: Sequence[str]) -> Answer:
        """Send one request and read its answer's bytes (the part that needs the connection)."""

    @abstractmethod
    def decode(self, answer: Answer) -> Embedding:
        """The answer's vectors in input order and its usage (CPU only: no connection)."""

    def embed(self, texts: Sequence[str]) -> Embedding:
        return self.decode(self.fetch(texts))

    def close(self) -> None:
        """Close the client's connections (a provider's client, when it has one, is `self.client`)."""
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def quota(self, headers: Mapping[str, str]) -> Quota:
        """What an answer's headers say of the remaining quota ({} when they say nothing)."""
        return {}

    def batch_line(self, custom_id: str, texts: Sequence[str]) -> dict | None:
        """One request line of a Batch API input file, or None when the provider has no Batch API."""
        return None

    # --- which errors mean what ------------------------------------------------------------------
    def status_error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None, code: str | None = None
    ) -> ProviderError:
        """An HTTP error status as the tool's own exception: stop, retry or split."""
        if status in (401, 403) and self.key_setting is None:
            return FatalProviderError(f"{self.host} refused the request ({status}: {message}); check its access rules")
        if status in (401, 403):
            return FatalProviderError(
                f"the API refused the key ({status}: {message}); check {self.key_setting}"
                + ("" if status == 401 else " and the key's access to the model")
            )
        if status == 404:
            return FatalProviderError(
                f"model {self.model} was not found at {self.endpoint} (404: {message}); "
                f"check EMBEDDING_MODEL and {self.url_setting}"
            )
        if status == 429:
            lowered = message.lower()
            if "insufficient_quota" in (code or "") or ("quota" in lowered and "exceeded" in lowered):
                return FatalProviderError(f"the account's quota is used up (429: {message}); check billing")
            return TransientProviderError(
                f"rate limited (429: {message})", retry_after_seconds(headers), kind="rate_limited"
            )
        if status in (408, 409) or status >= 500:
            return TransientProviderError(f"server error ({status}: {message})", retry_after_seconds(headers))
        if status in (400, 413, 422):
            return InvalidInputError(f"{status}: {message}", status, message)
        return FatalProviderError(f"the API answered {status}: {message}")

    def connection_error(self, cause: BaseException, timed_out: str | None = None) -> TransientProviderError:
        """No answer: no connection at all ("unreachable": refused, a name that does not resolve, a
        connect that timed out), a timeout (`timed_out` says what), or a connection dropped on the way."""
        import httpx2  # the SDK's HTTP library

        if isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            return TransientProviderError(f"cannot connect to {self.endpoint}: {cause_text(cause)}", kind="unreachable")
        if timed_out is not None:
            return TransientProviderError(f"request timed out ({timed_out})", kind="timeout")
        return TransientProviderError(f"connection error: {type(cause).__name__}: {cause_text(cause)}")


def model_context(model: str, info: ModelInfo | None) -> int:
    """The input limit of `model`: its ModelInfo's, a common open model's (by name), else 8191."""
    if info is not None:
        return info.max_input_tokens
    name = model.lower()
    return next((tokens for part, tokens in OPEN_MODEL_CONTEXTS if part in name), DEFAULT_MAX_INPUT_TOKENS)


def check_url(name: str, url: str | None) -> None:
    """Refuse a setting that should be a URL and is not (None: not set, nothing to check)."""
    parts = urlsplit(url or "http://x")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={url!r} is not a URL: write it as https://HOST (e.g. https://NAME.openai.azure.com)")


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or retry-after in seconds or as a date), or None."""
    headers = headers or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name, "")) * scale)
        except (TypeError, ValueError):
            pass
    try:
        when = parsedate_to_datetime(headers.get("retry-after", ""))
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def said(body: Any) -> str:
    """What a server said in an error body, whatever its shape: OpenAI's {"error": {"message"}},
    TEI's and Ollama's {"error": "..."}, FastAPI's {"detail": "..." or [{"msg": ...}]}, {"message"}, text."""
    if isinstance(body, str):
        return body.strip()
    if isinstance(body, list):
        return "; ".join(filter(None, (said(item) for item in body)))
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "msg"):
            if body.get(key):
                return said(body[key])
    return ""


def first_line(text: str) -> str:
    return text.splitlines()[0][:300] if text else ""


def cause_text(cause: BaseException) -> str:
    """An httpx error's text, with the innermost OS error when it has one ('[Errno 111] Connection refused')."""
    while cause.__context__ is not None and not str(cause):
        cause = cause.__context__
    return str(cause) or type(cause).__name__
