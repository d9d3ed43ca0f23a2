"""The planner: cut the id space of the rows still to embed into ranges of about equal work.

Cut points are quantiles of the NULL rows' ids, not min..max divided evenly (after a partial
run the NULL rows are skewed), taken from a block sample on big tables and from the partial
index when the NULL rows are few. The ranges always cover the whole id space (the first
and last are open-ended), so a poor sample costs balance, never rows.
"""

import logging

from . import db

log = logging.getLogger(__name__)

RANGES_PER_WORKER = 4
SAMPLE_PAGES = 300            # pages a block sample aims to read (about 30k small rows)
MIN_SAMPLE_PER_RANGE = 20     # NULL ids wanted per range before trusting a sample
SCAN_CAP = 200_000            # most ids read through the partial index
SMALL_TABLE_PAGES = 2_000     # below this (16 MB), scan instead of sampling
MAX_SAMPLE_PAGES = 50_000     # never sample more than this (400 MB) before falling back


def plan_ranges(conn, target, workers):
    """[(after, upto), ...] with text bounds (None = open) covering every id."""
    pieces = 1 if workers <= 1 else workers * RANGES_PER_WORKER
    if pieces == 1:
        return [(None, None)]
    fractions = [k / pieces for k in range(1, pieces)]
    cuts = None
    pages = db.table_pages(conn, target)
    if pages > SMALL_TABLE_PAGES:
        percent = min(100.0, 100.0 * SAMPLE_PAGES / pages)
        while True:
            sampled, values = _query(conn, target, "quantiles_sample", fractions=fractions, percent=percent)
            if sampled >= pieces * MIN_SAMPLE_PER_RANGE:
                cuts = values
                log.debug("cut points from a %.3f%% sample (%d NULL rows seen)", percent, sampled)
                break
            if percent >= 100.0 or pages * percent * 10 / 100 > MAX_SAMPLE_PAGES:
                break  # the NULL rows are rare: the partial index is the cheaper way
            percent = min(100.0, percent * 10)
    if cuts is None:
        _, cuts = _query(conn, target, "quantiles_scan", fractions=fractions, cap=SCAN_CAP)
    return ranges_from_cuts(cuts or [])


def ranges_from_cuts(cuts):
    """Consecutive (after, upto] ranges from sorted cut points, dropping repeats."""
    bounds = []
    for cut in cuts:
        if cut is not None and (not bounds or bounds[-1] != cut):
            bounds.append(cut)
    edges = [None] + bounds + [None]
    return list(zip(edges[:-1], edges[1:]))


def _query(conn, target, name, **params):
    with conn.cursor() as cur:
        cur.execute(target.query(name), params)
        count, values = cur.fetchone()
    conn.rollback()
    return count, values
