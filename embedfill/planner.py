"""The planner: cut the id space of the rows still to embed into ranges for the workers.

Cut points are quantiles of the NULL rows' ids, not min..max divided evenly (after a partial
run the NULL rows are skewed), read from a block sample on big tables and from the partial
index when the NULL rows are few. Range sizes follow guided scheduling: each range holds
about 1/(2·workers) of what is left, down to one batch, so the pool's queue hands out big
ranges first and small ones last, and no worker is left alone with a long range at the end.
The ranges always cover the whole id space (the first and last are open-ended), so a poor
sample costs balance, never rows. A worker process walks them with a RangeCursor.
"""

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import catalog
from .db import Connection

if TYPE_CHECKING:
    from .catalog import Target

log = logging.getLogger(__name__)

GRID = 1000  # quantiles read from the server; cut points are picked among them
SAMPLE_PAGES = 1000  # pages the first block sample aims to read (8 MB)
MIN_NULL_PAGES = 800  # sampled pages holding NULL rows wanted before trusting a sample
SCAN_CAP = 200_000  # most ids read through the partial index
SMALL_TABLE_PAGES = 2_000  # below this (16 MB), scan instead of sampling
MAX_SAMPLE_PAGES = 50_000  # never sample more than this (400 MB) before falling back

Range = tuple[str | None, str | None]  # (after, upto]: text bounds, None = open


def plan_ranges(conn: Connection, target: "Target", workers: int, batch_size: int) -> list[Range]:
    """[(after, upto), ...] with text bounds (None = open) covering every id."""
    if workers <= 1:
        return [(None, None)]
    estimate, grid = _quantile_grid(conn, target)
    if not grid:
        return [(None, None)]
    fractions = guided_fractions(workers, batch_size, estimate)
    cuts = [grid[min(len(grid) - 1, max(0, round(f * GRID) - 1))] for f in fractions]
    return ranges_from_cuts(cuts)


def guided_fractions(workers: int, batch_size: int, estimate: float) -> list[float]:
    """Cumulative fractions of the rows at which to cut: chunks of remaining/(2·workers),
    never smaller than one batch, at most GRID of them."""
    smallest = max(1.0 / GRID, min(1.0, batch_size / estimate)) if estimate > 0 else 1.0 / (4 * workers)
    fractions: list[float] = []
    done = 0.0
    while True:
        chunk = max((1.0 - done) / (2 * workers), smallest)
        if done + chunk >= 1.0 - 1e-9:
            return fractions
        done += chunk
        fractions.append(done)


def ranges_from_cuts(cuts: Sequence[str | None]) -> list[Range]:
    """Consecutive (after, upto] ranges from sorted cut points, dropping repeats."""
    bounds: list[str | None] = []
    for cut in cuts:
        if cut is not None and (not bounds or bounds[-1] != cut):
            bounds.append(cut)
    edges = [None] + bounds + [None]
    return list(zip(edges[:-1], edges[1:]))


def _quantile_grid(conn: Connection, target: "Target") -> tuple[float, list[str]]:
    """(estimated NULL rows, ids at every 1/GRID quantile of the NULL rows)."""
    fractions = [k / GRID for k in range(1, GRID)]
    pages = catalog.table_pages(conn, target)
    if pages > SMALL_TABLE_PAGES:
        percent = min(100.0, 100.0 * SAMPLE_PAGES / pages)
        while True:
            sampled, null_pages, values = _query(
                conn, target, "claim/quantiles_sample", fractions=fractions, percent=percent
            )
            estimate = sampled * 100.0 / percent
            if null_pages >= MIN_NULL_PAGES or percent >= 100.0:
                log.debug("cut points from a %.3f%% sample (%d NULL rows on %d pages)", percent, sampled, null_pages)
                return estimate, values
            if estimate <= SCAN_CAP / 2:
                break  # few NULL rows: the partial index gives exact cut points cheaply
            # Grow the sample by what the NULL pages seen so far say is needed (at most 10x).
            percent = min(100.0, percent * min(10.0, 1.25 * MIN_NULL_PAGES / max(null_pages, 1)))
            if pages * percent / 100 > MAX_SAMPLE_PAGES:
                break
    count, values = _query(conn, target, "claim/quantiles_scan", fractions=fractions, cap=SCAN_CAP)
    return count, values


def _query(conn: Connection, target: "Target", name: str, **params: Any) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(target.query(name), params)
        *counts, values = cur.fetchone()
    conn.rollback()
    return (*counts, values or [])


class RangeCursor:
    """Where one process stands in the ranges: the segment (after, upto) to claim from next,
    and the segments the open batch claimed from, walked again when the batch rolls back."""

    def __init__(self, take_range: Callable[[], Range | None]) -> None:
        self.take_range = take_range  # () -> (after, upto), or None when no range is left
        self.current: Range | None = None
        self.again: list[Range] = []
        self.claimed: list[Range] = []  # where each segment the open batch claimed from stood when it started
        self.noted = False  # the current segment is in `claimed`

    def segment(self) -> Range | None:
        """The (after, upto) to claim from next, or None when every range has been walked."""
        if self.current is None:
            self.current = self.again.pop(0) if self.again else self.take_range()
            self.noted = False
        if self.current is not None and not self.noted:
            self.claimed.append(self.current)
            self.noted = True
        return self.current

    def advance(self, last_id: str | None, full: bool) -> None:
        """After a claim from `segment()`: past its last row if it was full, else the segment is done."""
        self.current = (last_id, cast(Range, self.current)[1]) if full else None

    def commit(self) -> None:
        self.claimed, self.noted = [], False

    def rollback(self) -> None:
        """The open batch rolled back: walk its segments again, from where it started."""
        self.again = self.claimed + self.again
        self.claimed, self.current = [], None
