"""One request/token budget and one 429 cool-down shared by every worker process.

The budgets are token buckets kept in shared memory. A caller reserves what it needs at
once (the balance may go negative) and then sleeps until its reservation is paid for, so
N workers together never exceed the configured rate and nobody busy-waits. The cool-down is
a shared deadline: a 429 seen by one worker pauses them all, and so do response headers
that say the quota is nearly gone (x-ratelimit-remaining-*), before the server has to
answer 429 at all.
"""

import time

from .embedders import parse_reset

# Burst allowance: how many seconds of budget may be spent at once.
BURST_SECONDS = 1.0

_TOKENS, _REQUESTS, _STAMP, _COOLDOWN = range(4)


class RateLimiter:
    """Created in the parent before the pool starts; inherited by every worker."""

    def __init__(self, context, requests_per_minute=None, tokens_per_minute=None, workers=1):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.workers = workers
        self._lock = context.Lock()
        self._state = context.RawArray("d", 4)
        # Buckets start empty: the run ramps up at the configured rate instead of bursting.
        self._state[_TOKENS] = 0.0
        self._state[_REQUESTS] = 0.0
        self._state[_STAMP] = time.monotonic()
        self._state[_COOLDOWN] = 0.0

    @staticmethod
    def _capacity(per_minute):
        return max(1.0, per_minute / 60.0 * BURST_SECONDS)

    def reserve(self, tokens):
        """Take one request and `tokens` from the budgets; seconds to wait before sending."""
        with self._lock:
            now = time.monotonic()  # read under the lock: stamps only move forward
            state = self._state
            elapsed = max(0.0, now - state[_STAMP])
            state[_STAMP] = now
            wait = 0.0
            if self.tpm:
                rate = self.tpm / 60.0
                state[_TOKENS] = min(self._capacity(self.tpm), state[_TOKENS] + elapsed * rate) - tokens
                if state[_TOKENS] < 0:
                    wait = max(wait, -state[_TOKENS] / rate)
            if self.rpm:
                rate = self.rpm / 60.0
                state[_REQUESTS] = min(self._capacity(self.rpm), state[_REQUESTS] + elapsed * rate) - 1
                if state[_REQUESTS] < 0:
                    wait = max(wait, -state[_REQUESTS] / rate)
            cooldown = state[_COOLDOWN] - now
        return max(wait, cooldown, 0.0)

    def cooldown_left(self):
        """Seconds until the shared cool-down ends (0 when there is none)."""
        return max(0.0, self._state[_COOLDOWN] - time.monotonic())

    def pause(self, seconds):
        """Make every worker wait at least `seconds` before its next request."""
        with self._lock:
            until = time.monotonic() + seconds
            if until > self._state[_COOLDOWN]:
                self._state[_COOLDOWN] = until

    def observe(self, headers, last_tokens):
        """Slow down before the server says 429: when the quota left cannot cover one more
        request from every worker, pause all of them until the server has refilled enough."""
        if not headers:
            return 0.0
        pause = 0.0
        for kind, need in (("tokens", last_tokens * self.workers), ("requests", self.workers)):
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            try:
                remaining = float(headers.get(f"x-ratelimit-remaining-{kind}"))
                limit = float(headers.get(f"x-ratelimit-limit-{kind}") or 0)
            except (TypeError, ValueError):
                continue
            if reset is None or remaining >= need:
                continue
            # The limit is per minute and refills continuously: what is missing comes back at
            # limit/60 per second, and all of it by `reset`.
            wait = reset
            if limit > 0:
                wait = min(reset, (need - remaining) / (limit / 60.0))
            pause = max(pause, wait)
        if pause > 0:
            self.pause(pause)
        return pause
