"""The one request path: how a process sends its rows to the provider, whatever it does with the
vectors (the backfill's worker writes them, `verify` compares them, `--batch-api` lands the rows a
batch refused).

Every request goes within the run's budgets (ratelimit.py) and holds one of the run's `--workers`
slots from the budget to the answer's last byte. A failure that is the server's (a 429, 5xx, a
timeout, a lost or refused connection) is waited out and never put on a row, until no request of
the run has succeeded for --stall-seconds: then the run stops with one line. A timeout sends the
rows again as two halves and caps every process's requests; a refusal that says what the server
cannot take (more inputs or tokens a request, a longer input, base64, `dimensions`) teaches the run's
Shape (shape.py) and the rows go again as it allows; any other refusal is split down to the row
refused alone; so is a request that keeps failing (--max-attempts), and a row that then still fails
alone while the server answers a probe is the one at fault.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .errors import FatalProviderError, InvalidInputError, Stop, TransientProviderError
from .lessons import Learner
from .models import MAX_INPUTS_PER_REQUEST, MAX_TOKENS_PER_REQUEST

if TYPE_CHECKING:
    from multiprocessing.synchronize import Semaphore

    from .providers.base import Provider
    from .ratelimit import RateLimiter
    from .settings import Settings
    from .shape import Shape
    from .shared import SharedState

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# With no request of the run answered yet, this many single inputs refused in one batch that
# nothing of succeeded (or this many in all) mean the API refuses everything (a `dimensions` the
# model does not take, say): the run stops instead of recording rows that are not at fault.
REFUSALS_BEFORE_FATAL = 3
REFUSALS_CAP = 64
UNREACHABLE_SECONDS = 5.0  # no connection to the API at all since the run started: stop
PROBE_TEXT = "embedfill: is the server answering?"  # a few tokens, sent before a row is blamed for a server error

Failure = tuple[str, str, int]  # (row_id, reason, attempts), as etl_failures records it


@dataclass
class Row:
    row_id: str
    text: str
    tokens: int = 0


Embedded = list[tuple[list[Row], np.ndarray]]  # the rows of each request, and its vectors


def backoff(attempt: int) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def pack_requests(rows: list[Row], max_inputs: int | None = None, max_tokens: int | None = None) -> Iterator[list[Row]]:
    """Split rows into requests of at most `max_inputs` inputs and `max_tokens` tokens (by default
    OpenAI's 2048 and 300k)."""
    most = max_inputs or MAX_INPUTS_PER_REQUEST
    most_tokens = max_tokens or MAX_TOKENS_PER_REQUEST
    chunk: list[Row] = []
    chunk_tokens = 0
    for row in rows:
        if chunk and (len(chunk) >= most or chunk_tokens + row.tokens > most_tokens):
            yield chunk
            chunk, chunk_tokens = [], 0
        chunk.append(row)
        chunk_tokens += row.tokens
    if chunk:
        yield chunk


class Requester(Learner):
    """One process's requests: `embed(rows)` returns ([(rows, vectors)], failures).

    `shared` is the pass's SharedState (the stop flag, the counters), `limiter` the run's
    RateLimiter, `slots` the run-wide semaphore of --workers slots, `shape` what the run knows of the
    server (shape.py). With `stops_others` a fatal answer stops the run's other processes at once
    (verify reads each page's own error instead)."""

    def __init__(
        self,
        settings: Settings,
        embedder: Provider,
        shared: SharedState,
        limiter: RateLimiter,
        slots: Semaphore,
        shape: Shape,
        stops_others: bool = True,
    ) -> None:
        self.settings = settings
        self.embedder = embedder  # built in the parent, unused there: this process's own copy
        self.shared = shared
        self.limiter = limiter
        self.slots = slots
        self.shape = shape
        self.stops_others = stops_others
        self.refused = 0  # single inputs refused in the rows at hand
        self.asks_dimensions = bool(embedder.dimensions)
        self.usage_checked = False  # this process's first answer's usage was compared with our own count

    def embed(self, rows: list[Row]) -> tuple[Embedded, list[Failure]]:
        """The vectors of `rows` (packed into requests within the limits), and the rows refused."""
        self.refused = 0
        embedded: Embedded = []
        failures: list[Failure] = []
        for chunk in pack_requests(rows, *self.request_limits()):
            ok, failed = self.embed_request(chunk)
            embedded += ok
            failures += failed
        if self.refused >= REFUSALS_BEFORE_FATAL and not embedded and self.limiter.successes() == 0:
            self._refuses_everything(failures[-1][1])
        return embedded, failures

    def embed_request(self, rows: list[Row]) -> tuple[Embedded, list[Failure]]:
        """One request's rows, retried and split as the module docstring says."""
        attempt = limited = 0
        probed = False
        tokens = sum(row.tokens for row in rows)
        while True:
            try:
                result = self._request([row.text for row in rows], tokens, limited)
            except TransientProviderError as error:
                self.shared.add(retries=1, rate_limited=int(error.rate_limited), requests=1)
                stall_left = self._stall_left(error)
                if error.rate_limited:  # "not now", never "this row is bad": no attempt is spent
                    limited += 1
                    delay = min(self.limiter.cooldown_left(), stall_left)
                else:
                    self._check_reachable(error)
                    if error.kind == "timeout" and len(rows) > 1:
                        return self._split(rows, error)
                    attempt += 1
                    if attempt >= self.settings.max_attempts:
                        if len(rows) > 1:
                            return self._split(rows)  # the halves tell a server that is down from a bad row
                        if probed:
                            reason = f"the server fails on this input ({attempt} attempts) but answers others: {error}"
                            return [], [(rows[0].row_id, reason, attempt)]
                        probed = self._server_answers()
                        if probed:
                            continue  # once more, at once (on a fresh connection), before blaming the row
                    delay = min(backoff(attempt) if error.retry_after is None else error.retry_after, stall_left)
                log.info("%s; trying again in %.1f s", error, delay)
                self._sleep(delay)
                continue
            except InvalidInputError as error:
                self.shared.add(requests=1)
                if self._learn(error, rows):
                    return self._send([self._refit(rows)])
                if len(rows) > 1:
                    return self._split(rows)
                self.refused += 1
                if self.refused >= REFUSALS_CAP and self.limiter.successes() == 0:
                    self._refuses_everything(error)
                return [], [(rows[0].row_id, f"refused by the API: {error}", 1)]
            self.shared.add(requests=1, tokens=result.tokens)
            return [(rows, result.vectors)], []

    def _request(self, texts: list[str], tokens: int, limited: int = 0) -> Any:
        """One request, within the run's budgets, holding one of the --workers slots from the budget
        to the answer's last byte (back-offs and decoding happen outside it)."""
        self.shape.follow(self.embedder)
        with self.slots:
            self._wait_for_budget(tokens)
            sent = time.monotonic()
            try:
                answer = self.embedder.fetch(texts)
            except TransientProviderError as error:
                if error.rate_limited:  # pause every worker before another one takes this slot,
                    wanted = backoff(limited + 1) if error.retry_after is None else error.retry_after
                    self.limiter.rate_limited(min(wanted, self._stall_left(error)))  # never past --stall-seconds
                raise
            except FatalProviderError:  # a bad key or model: stop before another process sends
                self._stop_others()
                raise
            finally:
                self.shared.observe_latency(time.monotonic() - sent)
        result = self.embedder.decode(answer)
        result.tokens = self._check_answer(result, texts, tokens)
        self.limiter.succeeded()
        self.limiter.observe(self.embedder.quota(result.headers), result.tokens, tokens)
        return result

    def _server_answers(self) -> bool:
        """Does the server answer a request of one short text now? (Then a row it keeps failing on is
        at fault, not the server.)"""
        try:
            result = self._request([PROBE_TEXT], 4)
        except (TransientProviderError, InvalidInputError):
            self.shared.add(requests=1)
            return False
        self.shared.add(requests=1, tokens=result.tokens)
        return True

    def _split(self, rows: list[Row], timeout: TransientProviderError | None = None) -> tuple[Embedded, list[Failure]]:
        """Send the rows as two halves (after a refusal or repeated failures, to isolate the row at
        fault; after a timeout, because the request was too big for the server's time: then every
        process's requests are capped)."""
        middle = len(rows) // 2
        if timeout is not None and self.limiter.cap_inputs(middle):
            log.warning(
                "a request of %d inputs timed out (%s): requests carry at most %d input%s from now on",
                len(rows),
                timeout,
                middle,
                "s" if middle > 1 else "",
            )
        return self._send([rows[:middle], rows[middle:]])

    def _send(self, groups: list[list[Row]]) -> tuple[Embedded, list[Failure]]:
        """Each group's rows in requests as the run allows now (a cap learned meanwhile applies)."""
        embedded: Embedded = []
        failed: list[Failure] = []
        for group in groups:
            for chunk in pack_requests(group, *self.request_limits()):
                ok, bad = self.embed_request(chunk)
                embedded, failed = embedded + ok, failed + bad
        return embedded, failed

    def _refuses_everything(self, reason: object) -> NoReturn:
        self._stop_others()
        settings = "EMBEDDING_MODEL, EMBEDDING_DIMENSIONS and EMBEDDING_EXTRA_BODY"
        raise FatalProviderError(
            f"the API refuses every input ({reason}) and has answered no request of this run; check "
            + (settings if self.embedder.extra_body else "EMBEDDING_MODEL and EMBEDDING_DIMENSIONS")
        )

    def _check_reachable(self, error: TransientProviderError) -> None:
        """No connection to the API could be made since the run started: a wrong URL, or no network.
        Stop within a few seconds, naming the setting (the rows are not at fault)."""
        if error.kind != "unreachable" or self.limiter.successes() > 0:
            return
        if time.monotonic() - self.limiter["started"] < UNREACHABLE_SECONDS:
            return
        self._stop_others()
        setting = "AZURE_OPENAI_ENDPOINT" if self.settings.provider == "azure" else "OPENAI_BASE_URL"
        raise FatalProviderError(
            f"{error}; check {setting} (and the network): no request of this run has reached the API"
        ) from error

    def _stall_left(self, error: TransientProviderError) -> float:
        """Seconds left before no request of the run has succeeded for --stall-seconds (then it
        stops: waiting longer would not help, and no row is to blame)."""
        window = self.settings.stall_seconds
        stalled = self.limiter.stalled_for()
        if stalled >= window:
            self._stop_others()
            if error.rate_limited:
                raise FatalProviderError(
                    f"rate limited for {stalled:.0f} s with no request succeeding (--stall-seconds {window:g}): "
                    "another client may be using this key's quota; rerun when it is free, or lower --workers"
                ) from error
            raise FatalProviderError(
                f"no request has succeeded for {stalled:.0f} s (--stall-seconds {window:g}); the last error: "
                f"{error}. The server may be down or overloaded: rerun when it answers (nothing was recorded as failed)"
            ) from error
        return window - stalled

    def _stop_others(self) -> None:
        if self.stops_others:
            self.shared.request_stop(fatal=True)

    def _wait_for_budget(self, tokens: int) -> None:
        """Reserve one request and `tokens`, then wait until the reservation and any shared
        cool-down (which another worker may extend meanwhile) have passed."""
        if self.shared.stopping():
            raise Stop()
        wait = self.limiter.reserve(tokens)
        while wait > 0:
            self._sleep(wait)
            wait = self.limiter.cooldown_left()

    def _sleep(self, seconds: float) -> None:
        if self.shared.sleep(seconds):
            raise Stop()
