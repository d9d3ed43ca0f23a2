"""serve --http: GET /healthz (200 while the database answers and the loop turns, else 503) and
GET /metrics in the Prometheus text format (prometheus_client), by column. A thread of the parent
answers both from what the service's loop and the workers' shared counters say: a scrape never
waits on the database, and the workers never see it (its socket is closed in every forked child)."""

import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from .errors import UsageError
from .models import estimate_cost
from .shared import LATENCY_BUCKETS, LATENCY_FIELDS

if TYPE_CHECKING:
    from .service import Service
    from .tracked import Column

log = logging.getLogger(__name__)

COUNTERS = [  # (name, help, the shared counter)
    ("rows_embedded", "Rows whose vector the database holds after this process's writes", "embedded"),
    ("rows_failed", "Rows recorded in etl_failures by this process", "failed"),
    ("requests", "Requests sent to the embeddings API", "requests"),
    ("rate_limited", "Requests answered 429 (rate limited)", "rate_limited"),
    ("retries", "Requests sent again after a transient failure (429, 5xx, timeout, lost connection)", "retries"),
    ("tokens", "Input tokens billed (the API's usage, else our count)", "tokens"),
]
LABEL = ["column"]  # schema.table.column
LIMITS = ("max_inputs", "max_tokens", "input_tokens")  # what shape.py learned of the server


class Collector:
    """The service's state as metric families, read at each scrape."""

    def __init__(self, service: "Service") -> None:
        self.service = service
        self.high: dict[tuple[str, str], float] = {}  # counters never go back (a pass ending is read mid-way)

    def collect(self) -> Iterator[Metric]:
        columns = list(self.service.columns.values())
        families = {name: CounterMetricFamily(f"embedfill_{name}", text, labels=LABEL) for name, text, _ in COUNTERS}
        cost = CounterMetricFamily("embedfill_cost_usd", "Estimated cost of the tokens, in US dollars", labels=LABEL)
        waiting = GaugeMetricFamily("embedfill_rows_waiting", "Rows NULL at the service's last count", labels=LABEL)
        oldest = GaugeMetricFamily(
            "embedfill_oldest_waiting_seconds",
            "How long rows have been waiting: since the service last saw the column with none (0: none waits)",
            labels=LABEL,
        )
        latency = HistogramMetricFamily(
            "embedfill_request_seconds", "Time of one request, sent to last byte", labels=LABEL
        )
        limits = GaugeMetricFamily(
            "embedfill_learned_limit", "Request limits learned from the server's answers", labels=["column", "limit"]
        )
        kept = GaugeMetricFamily(
            "embedfill_column_kept", "1: the service keeps the column filled; 0: left alone (see the log)", labels=LABEL
        )
        now = time.monotonic()
        for column in columns:
            totals = self._totals(column)
            name = column.name
            for metric, _, field in COUNTERS:
                families[metric].add_metric([name], totals[field])
            price = estimate_cost(column.settings.model_name, int(totals["tokens"]), column.settings.price)
            if price is not None:
                cost.add_metric([name], price)
            if column.waiting is not None:
                waiting.add_metric([name], column.waiting)
            since = column.waiting_since
            oldest.add_metric([name], 0.0 if since is None else now - since)
            counts, running = [], 0.0
            for bound, field in zip([*map(str, LATENCY_BUCKETS), "+Inf"], LATENCY_FIELDS):
                running += totals[field]
                counts.append((bound, running))
            latency.add_metric([name], counts, totals["latency_ms"] / 1000)
            for limit in LIMITS:
                value = column.run.shape.limit(limit)
                if value:
                    limits.add_metric([name, limit], value)
            kept.add_metric([name], 1.0)
        for name in list(self.service.alone):
            kept.add_metric([name], 0.0)
        yield from families.values()
        yield from (cost, waiting, oldest, latency, limits, kept)

    def _totals(self, column: "Column") -> dict[str, float]:
        run = column.run
        earlier = run.earlier  # before the pass under way: a pass that ends sets it after dropping `shared`
        shared = run.shared
        current = shared.totals() if shared is not None else {}
        totals = {}
        for field, value in earlier.items():
            key, now = (column.name, field), value + current.get(field, 0) + column.before.get(field, 0)
            self.high[key] = totals[field] = max(self.high.get(key, 0), now)
        return totals


HEALTH_SECONDS = 10.0  # /healthz: the database answered, and the service's loop turned, within this


def health(service: "Service") -> tuple[bool, str]:
    """(healthy, why): the database answered within HEALTH_SECONDS and the loop turns."""
    now = time.monotonic()
    seen = max(service.pulse.answered_at, service.listener.seen_at)
    if now - seen > HEALTH_SECONDS:
        return False, f"the database has not answered for {now - seen:.0f} s"
    if now - service.beat > HEALTH_SECONDS:
        return False, f"the service's loop has not turned for {now - service.beat:.0f} s"
    return True, f"ok: {len(service.columns)} columns kept, {len(service.alone)} left alone"


def start(service: "Service", address: str) -> HTTPServer:
    """Listen on HOST:PORT and answer from a daemon thread; a one-line UsageError when the address is taken."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(service))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                healthy, why = health(service)
                self._answer(200 if healthy else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
            elif path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._answer(404, b"GET /healthz or /metrics\n", "text/plain; charset=utf-8")

        def _answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            log.debug("http: " + format, *args)

    try:
        server = HTTPServer((host, int(port)), Handler)
    except OSError as error:
        raise UsageError(f"--http {address}: cannot listen there ({error.strerror or error}): choose another") from None
    os.register_at_fork(after_in_child=server.socket.close)  # the workers never hold the port
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
