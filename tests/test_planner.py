"""The planner's ranges cover every id once and hold about the work guided scheduling asks for."""

import pytest

from embedfill import catalog
from embedfill import db as dbmod
from embedfill.planner import guided_fractions, plan_ranges
from embedfill.settings import resolve


def settings_for(url):
    return resolve({"database_url": url, "table": "big", "text_columns": ("body",)}, {}, {})


def null_rows_per_range(conn, ranges):
    counts = []
    with conn.cursor() as cur:
        for after, upto in ranges:
            cur.execute(
                "SELECT count(*) FROM big WHERE embedding IS NULL "
                "AND (%(a)s::bigint IS NULL OR id > %(a)s::bigint) AND (%(u)s::bigint IS NULL OR id <= %(u)s::bigint)",
                {"a": after, "u": upto},
            )
            counts.append(cur.fetchone()[0])
    return counts


@pytest.fixture
def big(db):
    with db.cursor() as cur:  # about 35 MB: big enough for the block-sample path
        cur.execute("CREATE TABLE big (id bigint PRIMARY KEY, body text, embedding vector(8))")
        cur.execute("INSERT INTO big SELECT g * 3, repeat('food ' || g, 20) FROM generate_series(1, 200000) g")
        cur.execute("CREATE INDEX ON big (id) WHERE embedding IS NULL")
        cur.execute("VACUUM ANALYZE big")
    return db


@pytest.mark.parametrize("skewed", [False, True])
def test_ranges_follow_the_null_rows(big, database_url, skewed):
    if skewed:  # a previous run embedded the first 80%
        with big.cursor() as cur:
            cur.execute("UPDATE big SET embedding = array_fill(0, ARRAY[8])::vector WHERE id <= 480000")
            cur.execute("VACUUM ANALYZE big")
    conn = dbmod.connect(database_url)
    target = catalog.inspect_target(conn, settings_for(database_url))
    assert catalog.table_pages(conn, target) > 2000
    ranges = plan_ranges(conn, target, workers=4, batch_size=50)
    conn.close()
    assert ranges[0][0] is None and ranges[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous: every id is in one range
    counts = null_rows_per_range(big, ranges)
    total = sum(counts)
    assert total == (40000 if skewed else 200000)
    # Guided scheduling: the first range holds about 1/(2·workers) of the work, the last few are small.
    # The uniform case cuts from a block sample of at least 800 pages with NULL rows: over 200
    # plans its first range had a standard deviation of 8.5% (min 0.78, max 1.24 of the target),
    # so 40% is about 4.7 sigma. The skewed case (40k NULL rows) is cut exactly from the index.
    assert counts[0] == pytest.approx(total / 8, rel=0.4 if not skewed else 0.01)
    assert max(counts[-3:]) < total / 20


def test_guided_fractions_shrink_to_one_batch():
    fractions = guided_fractions(workers=4, batch_size=20, estimate=8000)
    chunks = [b - a for a, b in zip([0.0] + fractions, fractions + [1.0])]
    assert chunks[0] == pytest.approx(1 / 8)
    assert all(x >= y - 1e-12 for x, y in zip(chunks, chunks[1:-1]))
    assert min(chunks[:-1]) == pytest.approx(20 / 8000)
    assert guided_fractions(workers=4, batch_size=2048, estimate=100) == []


class FakeShared:
    """The part of SharedState the pass's watch reads: the stop flag, started and busy workers."""

    def __init__(self, started=4, busy=4):
        self.started, self.busy, self.state = started, busy, None

    def stopping(self):
        return self.state is not None

    def request_stop(self, fatal=False):
        self.state = "fatal" if fatal or self.state == "fatal" else "stop"

    @property
    def workers_started(self):
        return self.started

    def busy_workers(self):
        return self.busy


def test_the_pass_watch_decides_without_a_database_or_a_process():
    from embedfill.errors import EtlError, WorkerDied
    from embedfill.passes import CONTINUE, END, FINISHED, PassWatch

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731

    watch, shared = PassWatch(4, grace=7.0, clock=clock), FakeShared()
    assert watch.judge(None, shared, 0) == CONTINUE
    assert watch.judge("done", shared, 0) == FINISHED and watch.fatal is None

    # A worker's error stops the others; in-flight batches get the grace period, then the end.
    watch, shared = PassWatch(4, grace=7.0, clock=clock), FakeShared()
    error = EtlError("the API refused the key")
    assert watch.judge(error, shared, 0) == CONTINUE and shared.state == "fatal" and watch.fatal is error
    now[0] += 6.9
    assert watch.judge(None, shared, 0) == CONTINUE
    now[0] += 0.2
    assert watch.judge(None, shared, 0) == END

    # A signal: the grace period; a second signal: the end at once.
    watch, shared = PassWatch(4, grace=7.0, clock=clock), FakeShared()
    shared.request_stop()
    assert watch.judge(None, shared, 1) == CONTINUE
    assert watch.judge(None, shared, 2) == END and watch.fatal is None

    # A worker that died (a fifth process started in its place): fatal, and once the survivors are
    # idle, the end (the dead worker's range never reports back).
    watch, shared = PassWatch(4, grace=7.0, clock=clock), FakeShared(started=5, busy=2)
    assert watch.judge(None, shared, 0) == CONTINUE and isinstance(watch.fatal, WorkerDied)
    shared.busy = 1
    assert watch.judge(None, shared, 0) == END
