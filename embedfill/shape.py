"""What the tool learns of a server from its answers, once, says once, and keeps: the inputs and
tokens one request may carry, the tokens one input may have, whether it takes base64 and
`dimensions`, whether its `usage` is tokens.

A run's processes share one Shape in shared memory (a lesson one worker learns caps the others'
next requests at once); the parent loads it from etl_limits (per endpoint and model) before the
workers start and keeps what they learned at the end of each pass, so the next run starts right.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg2

from . import db, schema
from .db import load_sql
from .errors import EtlError, InvalidInputError

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from .providers.base import Provider

log = logging.getLogger(__name__)

_FIELDS = ("max_inputs", "max_tokens", "input_tokens", "floats", "no_dimensions", "own_usage", "said", "changed")


class Shape:
    """Created in the parent before the pool; inherited by every process of the run."""

    def __init__(self, context: BaseContext) -> None:
        self._lock = context.Lock()
        self._state = context.RawArray("d", len(_FIELDS))

    def __getitem__(self, name: str) -> float:
        return self._state[_FIELDS.index(name)]

    def __setitem__(self, name: str, value: float) -> None:
        self._state[_FIELDS.index(name)] = value

    def limit(self, name: str) -> int | None:
        """A learned limit (max_inputs, max_tokens, input_tokens), or None."""
        return int(self[name]) or None

    def lower(self, name: str, value: int) -> bool:
        """Learn that `name` is at most `value`; True if that lowered it (then the caller says so)."""
        with self._lock:
            if self[name] and self[name] <= value:
                return False
            self[name], self["changed"] = max(1, value), 1
            return True

    def set_flag(self, name: str) -> bool:
        """Learn a yes (floats, no_dimensions, own_usage); True the first time."""
        with self._lock:
            if self[name]:
                return False
            self[name], self["changed"] = 1, 1
            return True

    def follow(self, provider: Provider) -> None:
        """Make `provider` ask as learned (another process may have learned it): floats, no `dimensions`."""
        if self["floats"] and provider.encoding:
            provider.encoding = "float"
        if self["no_dimensions"]:
            provider.dimensions = None

    def say_once(self, bit: int) -> bool:
        with self._lock:
            if int(self["said"]) & bit:
                return False
            self["said"] = int(self["said"]) | bit
            return True

    # --- kept between runs ---------------------------------------------------------------------
    def load(self, conn: db.Connection, endpoint: str, model: str) -> None:
        """What earlier runs learned of this endpoint and model (etl_limits), said in one line (nothing
        on a database no run of this version has migrated: a read-only verb's)."""
        endpoint = where(endpoint)
        if schema.version(conn) < schema.VERSION:
            conn.rollback()
            return
        with conn.cursor() as cur:
            cur.execute(load_sql("shape/load_shape"), {"endpoint": endpoint, "model": model})
            row = cur.fetchone()
        conn.rollback()
        if row is None:
            return
        for name, value in zip(_FIELDS, row):
            self[name] = float(value or 0)
        known = ", ".join(f"{name}={self.limit(name)}" for name in _FIELDS[:3] if self[name])
        known += "".join(f", {name}" for name in _FIELDS[3:6] if self[name])
        log.info("what earlier runs learned of %s (%s): %s", endpoint, model, known.lstrip(", ") or "nothing")

    def keep(self, database_url: str | None, endpoint: str, model: str) -> None:
        """Keep what this run learned, if anything, for the next (one short connection; a failure to
        keep it is said, not the run's)."""
        if not self["changed"]:
            return
        values = {name: (int(self[name]) or None) if name in _FIELDS[:3] else bool(self[name]) for name in _FIELDS[:6]}
        endpoint = where(endpoint)
        try:
            conn = db.connect(database_url, timeout=3)
            try:
                with conn.cursor() as cur:
                    cur.execute(load_sql("shape/save_shape"), {"endpoint": endpoint, "model": model, **values})
                conn.commit()
            finally:
                conn.close()
            self["changed"] = 0
        except (psycopg2.Error, EtlError) as error:
            log.warning("could not keep what the run learned of the server: %s", db.first_line(error))


def where(endpoint: str) -> str:
    """The endpoint as etl_limits keys it: no user or password of the URL (never stored)."""
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


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
