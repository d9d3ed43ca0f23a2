"""What a server's answers teach, and what the tool does about it: `lesson` reads a refusal (a limit
of inputs or tokens, base64 or `dimensions` not taken), `Learner` (the Requester's part) applies it
to the run's Shape and to the rows at hand, and checks each answer's usage and norm; `embed_once`
is the same for one text outside a run (search, the --defer-index probe)."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInputError
from .texts import count_tokens, fit

if TYPE_CHECKING:
    from .providers.base import Provider
    from .ratelimit import RateLimiter
    from .requester import Row
    from .settings import Settings
    from .shape import Shape

log = logging.getLogger(__name__)

USAGE_FAR = 3.0  # an answer's usage this many times above or below our own count is not in tokens
SAID_NORM = 1  # a Shape.say_once bit

LESSONS = {
    "floats": "the server does not take encoding_format=base64: vectors are asked as floats from now on",
    "no_dimensions": "the server does not accept the `dimensions` parameter: it is sent no more, and the vectors' "
    "length is checked instead",
    "input_tokens": "the server takes at most %d tokens an input: longer inputs are cut to that (counted with "
    "cl100k, an approximation for this model)",
    "max_tokens": "the server takes at most %d tokens a request: requests carry no more",
    "max_inputs": "the server takes at most %d inputs a request: batches of %d become %d",
}


def embed_once(provider: Provider, shape: Shape, text: str) -> np.ndarray:
    """One text's vector outside a run's request path (search, the --defer-index probe), asked as the
    shape says; a refusal of base64 or `dimensions` is learned (said once) and the text asked again."""
    while True:
        shape.follow(provider)
        try:
            return provider.embed([text]).vectors[0]
        except InvalidInputError as error:
            found = lesson(error.status, error.said, 1)
            if found is None or found[0] not in ("floats", "no_dimensions") or not shape.set_flag(found[0]):
                raise
            log.warning(LESSONS[found[0]])


_NUMBER = re.compile(r"(?<![\w.-])\d+(?![\w.-])")  # a number alone, not a part of a name (voyage-3-large)
_CONTEXT = re.compile(
    r"(?:context length|sequence length|input length|tokens per input)\D{0,20}(\d+)|(?:less than|at most) (\d+) tokens"
)
_REQUEST_TOKENS = re.compile(
    r"(?:max(?:imum)?|at most|max is)\D{0,12}(\d+) tokens? (?:per|in a|in one) (?:request|batch)"
    r"|tokens? (?:in|per) (?:the |a |one |submitted )?(?:request|batch)\D{0,30}(?:max(?:imum)?|max is|limit|is)"
    r"\D{0,8}(\d+)"
)
_INPUTS = re.compile(r"items|inputs|batch|too many|elements|array|list|texts|sentences|requests")


def lesson(status: int | None, message: str, inputs: int) -> tuple[str, int] | None:
    """What a refusal (400/413/422) of a request of `inputs` inputs says of the server, or None when it
    is about the inputs themselves: ("floats"|"no_dimensions", 1), ("input_tokens"|"max_tokens"|
    "max_inputs", the limit it states), or ("fewer_inputs", half the inputs) for a request too big
    by a limit it does not state (a proxy's 413: a guess, for this run only)."""
    text = message.lower()
    if "base64" in text and re.search(r"not (?:currently )?supported|unsupported|invalid|unknown", text):
        return "floats", 1
    if "dimensions" in text and re.search(r"unrecognized|not (?:currently )?supported|unsupported|unexpected|"
                                          r"extra|not allowed|not permitted|unknown", text):  # fmt: skip
        return "no_dimensions", 1
    if found := _REQUEST_TOKENS.search(text):
        return "max_tokens", int(found.group(1) or found.group(2))
    if found := _CONTEXT.search(text):
        return "input_tokens", int(found.group(1) or found.group(2))
    if inputs > 1 and (status == 413 or _INPUTS.search(text)):
        below = [int(n) for n in _NUMBER.findall(text) if 1 <= int(n) < inputs and int(n) != status]
        if below and (status in (413, 422) or "at most" in text or "maximum" in text or "max" in text):
            return "max_inputs", max(below)
        if status == 413 or "too many" in text:
            return "fewer_inputs", max(1, inputs // 2)
    return None


def least(*limits: int | None) -> int | None:
    """The smallest of the limits that are known (None: none is)."""
    known = [limit for limit in limits if limit]
    return min(known) if known else None


class Learner:
    """The Requester's part that learns from the server: its limits as known now, a refusal's lesson,
    each answer's usage and norm. Per process: `usage_checked`; shared by the run: `shape`."""

    settings: Settings
    embedder: Provider
    limiter: RateLimiter
    shape: Shape
    asks_dimensions: bool
    usage_checked: bool

    def input_limit(self) -> int:
        """The longest input in tokens sent unchanged: the model's (or ETL_MAX_INPUT_TOKENS), or less if
        the server said so."""
        return least(self.embedder.limits.max_input_tokens, self.shape.limit("input_tokens")) or 0

    def request_limits(self) -> tuple[int | None, int | None]:
        """(inputs, tokens) one request may carry: the provider's, lowered by what the server said and by
        this run's timeouts."""
        limits, shape = self.embedder.limits, self.shape
        inputs = least(limits.max_inputs, shape.limit("max_inputs"), self.limiter.max_inputs())
        return inputs, least(limits.max_tokens, shape.limit("max_tokens"))

    def _learn(self, error: InvalidInputError, rows: list[Row]) -> bool:
        """What a refusal teaches of the server (said once, for every process of the run); True when
        the rows should go again as the run now knows to send them."""
        found = lesson(error.status, error.said, len(rows))
        if found is None:
            return False
        name, value = found
        shape, embedder = self.shape, self.embedder
        if name in ("floats", "no_dimensions"):
            if (embedder.encoding != "base64") if name == "floats" else not embedder.dimensions:
                return False  # already so: the refusal is about something else
            if shape.set_flag(name):
                log.warning(LESSONS[name])
            self.shape.follow(self.embedder)
            return True
        longest = max(row.tokens for row in rows)
        if name == "fewer_inputs":  # a limit not stated: a guess, for this run only (as after a timeout)
            if self.limiter.cap_inputs(value):
                log.warning(
                    "the server refused a request of %d inputs as too big: at most %d from now on", len(rows), value
                )
            return len(rows) > value
        if name == "input_tokens":
            # Our count (cl100k) may fall short of the model's own: refused at a limit already applied, cut
            # the longest input 20 % further.
            value = value if value < self.input_limit() and longest > value else int(min(value, longest) * 0.8)
            if not self.settings.truncate or value < 16 or longest <= value:
                return False
        if name == "max_tokens" and len(rows) == 1:
            return False  # one input over a request's tokens: the row, alone, is what the server refuses
        if shape.lower(name, value):
            wanted = (value, self.settings.batch_size, value) if name == "max_inputs" else (value,)
            log.warning(LESSONS[name], *wanted[: LESSONS[name].count("%d")])
        if name == "max_inputs":
            return len(rows) > (shape.limit(name) or 0)
        if name == "max_tokens":
            return sum(row.tokens for row in rows) > (shape.limit(name) or 0)
        return True

    def _refit(self, rows: list[Row]) -> list[Row]:
        """The rows cut to the input limit as the run knows it now."""
        limit, exact = self.input_limit(), self.settings.tpm is not None
        cut = [(row, *fit(row.text, limit, exact)[:2]) for row in rows if row.tokens > limit]
        again = {id(row): replace(row, text=text, tokens=tokens) for row, text, tokens in cut}
        return [again.get(id(row), row) for row in rows]

    def _check_answer(self, result: Any, texts: list[str], counted: int) -> int:
        """The tokens to count for an answer: its usage, or our own count when its usage is not in
        tokens (zero, absent, characters, more than the bytes, or far from our exact count, in this
        process's first answer; said once). Warns once when vectors shortened by `dimensions` come
        back not normalised."""
        if self.asks_dimensions and self.embedder.dimensions and self.shape.say_once(SAID_NORM):
            norm = float(np.linalg.norm(result.vectors[0]))
            if abs(norm - 1.0) > 0.01:
                log.warning(
                    "the server shortened the vectors to %d dimensions without normalising them (norm %.2f): "
                    "cosine distance (<=>) is right, inner product (<#>) and L2 (<->) are not",
                    result.vectors.shape[1],
                    norm,
                )
        if not self.embedder.reports_usage:  # the local provider bills nothing: 0 is right
            return result.tokens
        if self.shape["own_usage"]:
            return sum(count_tokens(text) for text in texts)
        if self.usage_checked:
            return result.tokens
        self.usage_checked = True
        usage, characters = result.tokens, sum(map(len, texts))
        most = sum(len(text.encode()) for text in texts) + 2 * len(texts)  # no tokenizer makes more (markers included)
        if usage == characters:  # characters, unless these texts have about as many tokens (short codes: "A1")
            counted = sum(count_tokens(text) for text in texts)
            near = abs(usage - counted) <= 0.25 * counted
        else:  # with a token budget the counts are exact: compare (else they are bounds)
            near = self.settings.tpm is None or counted / USAGE_FAR <= usage <= counted * USAGE_FAR
        if 0 < usage <= most and near:
            return usage
        if self.shape.set_flag("own_usage"):
            log.warning(
                "the server's usage is not in tokens (it said %d for inputs of %d characters): tokens are "
                "counted here instead (cl100k, an approximation for this model)",
                usage,
                characters,
            )
        return sum(count_tokens(text) for text in texts)
