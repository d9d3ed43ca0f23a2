"""Ollama's native embed API: POST {OPENAI_BASE_URL, default http://localhost:11434}/api/embed.

The request is {"model", "input": [texts], "truncate", "dimensions"}; the answer {"model",
"embeddings": [[floats]...] in input order, "total_duration", "load_duration", "prompt_eval_count"};
an error {"error": "..."} with 400 (an input refused), 404 (a model not pulled) or 500. No key, no
quota headers, no Batch API. Ollama's OpenAI-compatible /v1 works with ETL_PROVIDER=openai too;
this one lets the server cut an input to the model's own context with the model's own tokenizer
(or refuse it, with --no-truncate) and reports the tokens it really evaluated.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from ..errors import FatalProviderError, ProviderError, TransientProviderError
from .base import Answer, Embedding, Provider, first_line, said

DEFAULT_URL = "http://localhost:11434"


class OllamaProvider(Provider):
    name = "ollama"

    def __init__(self, settings: Any, column_dimensions: int | None = None):
        # Ollama's own URL; its OpenAI-compatible one (…/v1) is taken to mean the same server.
        endpoint = (settings.base_url or DEFAULT_URL).rstrip("/").removesuffix("/v1").removesuffix("/api")
        super().__init__(settings, column_dimensions, endpoint)
        self.truncate = settings.truncate  # --no-truncate: the server refuses an input over its context
        self.client: Any = None

    def request_body(self, texts: Sequence[str]) -> dict:
        body = {"model": self.model, "input": list(texts), "truncate": self.truncate}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        return {**body, **self.extra_body}

    def open(self) -> "OllamaProvider":
        import httpx2  # the SDK's HTTP library (openai<4 pins it below 3)

        self._httpx = httpx2
        self.client = httpx2.Client(base_url=self.endpoint, timeout=self.settings.request_timeout)
        return self

    def fetch(self, texts: Sequence[str]) -> Answer:
        httpx2 = self._httpx
        try:
            response = self.client.post("/api/embed", json=self.request_body(texts))
        except httpx2.TimeoutException as error:  # a connect that timed out is "unreachable" (connection_error)
            raise self.connection_error(error, str(error) or type(error).__name__) from error
        except httpx2.TransportError as error:
            raise self.connection_error(error) from error
        if response.status_code != 200:
            raise self.status_error(response.status_code, _message(response), response.headers)
        return Answer(response.content, response.headers, len(texts))

    def decode(self, answer: Answer) -> Embedding:
        try:
            payload = json.loads(cast(bytes, answer.body))
            answer.body = None
            vectors = np.asarray(payload["embeddings"], dtype=np.float32)  # ragged lists: ValueError
            tokens = int(payload.get("prompt_eval_count") or 0)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TransientProviderError(f"malformed response: {type(error).__name__}: {error}") from error
        if vectors.ndim != 2 or vectors.shape[0] != answer.count:
            got = len(payload["embeddings"]) if isinstance(payload["embeddings"], list) else "no list of"
            raise TransientProviderError(f"the API returned {got} embeddings for {answer.count} inputs")
        return Embedding(vectors, tokens, answer.headers)

    def status_error(
        self, status: int, message: str, headers: Mapping[str, str] | None = None, code: str | None = None
    ) -> ProviderError:
        if status == 404 and "model" in message.lower():
            return FatalProviderError(
                f"model {self.model} was not found at {self.endpoint} (404: {message}); "
                f"pull it on the server (ollama pull {self.model}) or check EMBEDDING_MODEL"
            )
        if status == 404:
            return FatalProviderError(
                f"{self.endpoint} has no Ollama embed API (404: {message}); check OPENAI_BASE_URL "
                f"(Ollama's own URL, like {DEFAULT_URL}; Ollama 0.3 or later)"
            )
        if status == 400 and "does not support" in message.lower():  # a chat model: no row is at fault
            return FatalProviderError(
                f"{self.model} at {self.host} makes no embeddings (400: {message}); set EMBEDDING_MODEL"
            )
        return super().status_error(status, message, headers, code)


def _message(response: Any) -> str:
    try:
        text = said(response.json())
    except ValueError:
        text = ""
    return first_line(text or response.text.strip()) or f"HTTP {response.status_code}"
