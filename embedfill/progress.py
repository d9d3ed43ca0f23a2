"""The one progress display, in the parent, fed by the workers' shared counters.

On a terminal it is a tqdm bar that starts at once (its total arrives when the count
through the partial index finishes). Elsewhere (nohup, a log file) it is a plain log line
every --progress-interval seconds, always with the same key=value pairs.
"""

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

from .models import estimate_cost

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    def __init__(self, stream: TextIO, interval: float = 10.0, tty: bool | None = None, follow: bool = False) -> None:
        self.stream = stream
        self.follow = follow  # --follow: the lines also say when a row was last embedded
        self.interval = interval
        self.tty = stream.isatty() if tty is None else tty
        self.started = time.monotonic()
        self.total: int | None = None
        self._last_line = self.started
        self._done = 0
        self.active_at = self.started
        self.bar = None
        if self.tty:
            tqdm.monitor_interval = 0  # no monitor thread: the pool may fork again later
            self.bar = tqdm(total=None, unit="row", file=stream, dynamic_ncols=True, smoothing=0.1, desc="embedding")

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self._done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self._done) / rate)

    def update(self, totals: Mapping[str, int], force_line: bool = False) -> None:
        done = totals["embedded"] + totals["failed"]
        if done > self._done:
            self.active_at = time.monotonic()
        if self.bar is not None:
            if done > self._done:
                self.bar.update(done - self._done)
            self.bar.set_postfix(failed=totals["failed"], refresh=False)
            self._done = done
            return
        self._done = done
        now = time.monotonic()
        if force_line or now - self._last_line >= self.interval:
            self._last_line = now
            log.info("%s", self.line(totals))

    def line(self, totals: Mapping[str, int]) -> str:
        """The parseable progress line: the same keys every time."""
        total = "unknown" if self.total is None else self.total
        eta = self.eta()
        return (
            f"progress done={self._done} embedded={totals['embedded']} failed={totals['failed']} "
            f"total={total} rows_per_s={self.rate():.1f} eta={format_eta(eta)} "
            f"elapsed={format_eta(time.monotonic() - self.started)}"
            + (f" last_activity={format_eta(time.monotonic() - self.active_at)}_ago" if self.follow else "")
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(
    settings: "Settings", totals: Mapping[str, int], elapsed: float, skipped: int, still_null: int | None = None
) -> str:
    """The parseable summary: what the database holds now, counted from RETURNING, not from what was sent."""
    rate = (totals["embedded"] + totals["failed"]) / elapsed if elapsed > 0 else 0.0
    cost = estimate_cost(settings.model_name, totals["tokens"], settings.price, batch=settings.batch_api)
    return (
        f"summary embedded={totals['embedded']} failed={totals['failed']} skipped_known_failures={skipped} "
        f"elapsed_s={elapsed:.1f} rows_per_s={rate:.1f} tokens={totals['tokens']} "
        f"cost_usd={'unknown' if cost is None else f'{cost:.4f}'} requests={totals['requests']} "
        f"retries={totals['retries']} rate_limited={totals['rate_limited']} truncated={totals['truncated']}"
        + ("" if still_null is None else f" still_null={still_null}")
        + (" batch_api=yes" if settings.batch_api else "")
    )
