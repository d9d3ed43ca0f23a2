"""The rate limits of a run, shared by all its worker processes in shared memory.

Token buckets: a worker reserves what it needs (the balance may go negative), then sleeps
until it is paid for. The rate is the least of the configured budget and the limit the server's
answers state (their provider reads them: Provider.quota), divided between the runs sharing
the key (lease.py), times an AIMD factor: a burst of 429s cuts it by DECREASE, each second of
success gives back INCREASE.
With no limit known at all, the first 429 takes the request rate measured until then.
A 429, or headers saying the quota is nearly gone, set a cool-down that pauses every worker.
Token estimates are scaled by the ratio of the answers' `usage` to them.
"""

import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from .providers.base import Quota

BURST_SECONDS = 1.0  # how many seconds of budget may be spent at once
DECREASE = 0.7  # a burst of 429s multiplies the rate by this
INCREASE = 0.005  # every second of success adds this to the factor (up to 1)
CUT_SPACING = 2.0  # seconds: the 429s of one burst count as one
BLIND_PAUSE = 1.0  # seconds to wait when only the remaining quota is known, and it is short
RATE_WINDOW = 5.0  # seconds over which the request rate is measured (exponential decay)

_FIELDS = (
    "tokens requests stamp cooldown share factor ratio server_tpm server_rpm measured_rpm "
    "last_cut last_success recent recent_at started successes max_inputs renewed_at"
).split()


class RateLimiter:
    """Created in the parent before the pool starts; inherited by every worker."""

    def __init__(
        self,
        context: "BaseContext",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        workers: int = 1,
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.workers = workers
        self._lock = context.Lock()
        self._state = context.RawArray("d", len(_FIELDS))
        self["share"] = self["factor"] = 1.0
        self.start()

    def start(self) -> None:
        """The run's clock starts now (when its workers start): buckets start empty, so that the run
        ramps up at its rate instead of bursting, and no request has been waited for yet."""
        now = time.monotonic()
        for name in ("stamp", "recent_at", "last_success", "started"):
            self[name] = now

    def __getitem__(self, name: str) -> float:
        return self._state[_FIELDS.index(name)]

    def __setitem__(self, name: str, value: float) -> None:
        self._state[_FIELDS.index(name)] = value

    def rates(self) -> tuple[float | None, float | None]:
        """(tokens in the workers' counting, requests) per minute this run may use now; None: no limit."""
        scale = self["factor"] / self["share"]
        tpm = min(self.tpm or math.inf, self["server_tpm"] or math.inf) * scale / (self["ratio"] or 1.0)
        rpm = min(self.rpm or math.inf, self["server_rpm"] or math.inf) * scale
        if math.isinf(rpm) and math.isinf(tpm) and self["measured_rpm"]:
            rpm = self["measured_rpm"] * self["factor"]  # this run's own rate: not divided
        return (None if math.isinf(tpm) else tpm), (None if math.isinf(rpm) else rpm)

    def reserve(self, tokens: int) -> float:
        """Take one request and `tokens` from the budgets; seconds to wait before sending."""
        with self._lock:
            now = time.monotonic()  # read under the lock: stamps only move forward
            elapsed = max(0.0, now - self["stamp"])
            self["stamp"] = now
            wait = 0.0
            for name, per_minute, need in zip(("tokens", "requests"), self.rates(), (tokens, 1)):
                if per_minute:
                    rate = per_minute / 60.0
                    self[name] = min(max(need, rate * BURST_SECONDS), self[name] + elapsed * rate) - need
                    if self[name] < 0:
                        wait = max(wait, -self[name] / rate)
            return max(wait, self["cooldown"] - now, 0.0)

    def cooldown_left(self) -> float:
        """Seconds until the shared cool-down ends (0 when there is none)."""
        return max(0.0, self["cooldown"] - time.monotonic())

    def set_share(self, runs: int) -> None:
        """The budgets are split between `runs` runs using the same API key."""
        with self._lock:
            self["share"] = float(max(1, runs))

    def succeeded(self) -> None:
        """A request succeeded: count it, and give the factor back a little."""
        with self._lock:
            now = time.monotonic()
            since = now - max(self["last_success"], self["last_cut"])
            self["factor"] = min(1.0, self["factor"] + INCREASE * max(0.0, since))
            self["last_success"] = now
            self["successes"] += 1
            self["recent"] = self["recent"] * math.exp(-(now - self["recent_at"]) / RATE_WINDOW) + 1.0
            self["recent_at"] = now

    def successes(self) -> int:
        """Requests that succeeded in this run, in every process."""
        return int(self["successes"])

    def succeeded_since(self, moment: float) -> bool:
        """Whether any process's request succeeded after `moment` (time.monotonic())."""
        return self["successes"] > 0 and self["last_success"] > moment

    def max_inputs(self) -> int | None:
        """The most inputs a request may carry, as learned in this run (None: no limit learned)."""
        return int(self["max_inputs"]) or None

    def cap_inputs(self, inputs: int) -> bool:
        """Requests carry at most `inputs` from now on, in every process; True if that lowered the cap."""
        with self._lock:
            if self["max_inputs"] and self["max_inputs"] <= inputs:
                return False
            self["max_inputs"] = max(1, inputs)
            return True

    def rate_limited(self, seconds: float) -> None:
        """A 429: pause every worker for `seconds`, and cut the rate once per burst of 429s."""
        with self._lock:
            now = time.monotonic()
            self["cooldown"] = max(self["cooldown"], now + seconds)
            if now - self["last_cut"] < CUT_SPACING:
                return
            recent = self["recent"] * math.exp(-(now - self["recent_at"]) / RATE_WINDOW)
            if self.rates() == (None, None) and recent >= 1.0:  # no limit known: the rate measured until now is one
                window = RATE_WINDOW * (1.0 - math.exp(-(now - self["started"]) / RATE_WINDOW))
                self["measured_rpm"] = max(1.0, 60.0 * recent / max(window, 0.5))
            self["factor"] = max(0.02, self["factor"] * DECREASE)
            self["last_cut"] = now

    def stalled_for(self) -> float:
        """Seconds since a request last succeeded (or since the run started)."""
        return time.monotonic() - self["last_success"]

    def observe(self, quota: "Quota", usage: int, counted: int) -> float:
        """Learn from an answer: the ratio of its `usage` to the tokens the worker counted, the
        key's limits (`quota`: what the answer says of them, providers.QuotaLeft by kind), and whether
        the quota left can cover one more request from every worker of every run sharing it (if
        not, pause until the server has refilled enough)."""
        with self._lock:
            if usage > 0 and counted > 0:
                ratio = usage / counted
                self["ratio"] = 0.8 * self["ratio"] + 0.2 * ratio if self["ratio"] else ratio
            senders = self.workers * self["share"]
            pause = 0.0
            for kind, need in (("tokens", (usage or counted) * senders), ("requests", senders)):
                said = quota.get(kind)
                if said is None or said.remaining is None:
                    continue
                limit, remaining = said.limit or 0.0, said.remaining
                self[f"server_{kind[0]}pm"] = limit
                if remaining >= need:
                    continue
                # What is missing comes back at limit/60 per second, and all of it by the reset;
                # Azure may send neither: then wait BLIND_PAUSE and look at the next answer.
                reset = said.reset
                waits = ([reset] if reset is not None else []) + ([(need - remaining) * 60.0 / limit] if limit else [])
                pause = max(pause, min(waits or [BLIND_PAUSE]))
            if pause > 0:
                self["cooldown"] = max(self["cooldown"], time.monotonic() + pause)
        return pause
