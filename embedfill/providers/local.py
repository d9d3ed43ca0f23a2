"""Offline lexical embeddings: feature hashing of character n-grams and words.

Deterministic, any dimension, works for any script (Korean included). It captures spelling
overlap, not meaning: "김치찌개" is near "김치전", not near "stew". It bills no tokens, so a run
with it reports tokens=0. No network: `fetch` computes the vectors itself.
"""

import zlib
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from .base import DEFAULT_MAX_INPUT_TOKENS, Answer, Embedding, ModelInfo, Provider

LOCAL_MODEL = "local-hashing"
LOCAL_DEFAULT_DIMENSIONS = 256


class LocalProvider(Provider):
    name = "local"
    reports_usage = False
    models = {LOCAL_MODEL: ModelInfo(LOCAL_DEFAULT_DIMENSIONS, DEFAULT_MAX_INPUT_TOKENS, 0.0)}

    def __init__(self, settings: Any, column_dimensions: int | None = None):
        super().__init__(settings, column_dimensions, endpoint="local", secret="local")
        self.model = self.model_name = LOCAL_MODEL
        # vectors of any size: EMBEDDING_DIMENSIONS, else the column's
        self.dimensions = settings.dimensions or column_dimensions or LOCAL_DEFAULT_DIMENSIONS

    def check(self) -> None:
        """Nothing to check: no server, no key."""

    @property
    def host(self) -> str:
        return "local"

    def request_body(self, texts: Sequence[str]) -> dict:
        return {"input": list(texts), "dimensions": self.dimensions}

    def fetch(self, texts: Sequence[str]) -> Answer:
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
        return Answer(matrix.tobytes(), {}, len(texts))

    def decode(self, answer: Answer) -> Embedding:
        vectors = (
            np.frombuffer(cast(bytes, answer.body), dtype=np.float32).reshape(answer.count, self.dimensions).copy()
        )
        return Embedding(vectors, 0, {})  # no API, no tokens billed


def _features(text: str) -> list[str]:
    normalized = " ".join(text.lower().split())
    padded = f" {normalized} "
    grams = [padded[i : i + n] for n in (2, 3) for i in range(len(padded) - n + 1)]
    words = ["w:" + word for word in normalized.split()]
    return grams + words or ["<empty>"]
