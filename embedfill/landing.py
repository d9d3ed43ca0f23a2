"""--batch-api, landing: look at the pending batches, read the files of those that ended, write
their vectors (the same guarded write as a normal run: where a row is still NULL with the text
that was sent, a chunk per commit), submit again what expired once, and send the few rows a batch
refused through the normal endpoint and the backfill's own request path."""

import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .batchapi import ENDED, GIVEN_UP, LAND_CHUNK_ROWS, Record, api
from .errors import FatalProviderError
from .providers.openai import decode_vector
from .ratelimit import RateLimiter
from .requester import Failure, Requester, Row
from .shared import SharedState
from .texts import fit, row_text

if TYPE_CHECKING:
    from .batchapi import BatchRun

log = logging.getLogger(__name__)

Place = tuple[str, int | None]  # (row_id, the hash of the text sent), of one vector


class Landing:
    """The landing of one table's batches, on its BatchRun (the connection, the client, the totals)."""

    def __init__(self, run: "BatchRun") -> None:
        self.run = run
        self.landed = 0
        self.counts: dict[str, tuple[int, int]] = {}  # key -> (completed, total) at the last poll

    def poll(self) -> list[Record]:
        """Look at every pending batch once, landing those that ended. Returns what is still pending."""
        for record in self.run.pending():
            if record.batch_id is not None:
                self.check(record)
        return self.run.pending()

    def wait(self) -> None:
        while True:
            pending = self.poll()
            rows = self.run.execute("batch/batch_rows_pending").fetchone()[0]
            self.run.conn.rollback()
            completed, total = (sum(counts) for counts in zip((0, 0), *self.counts.values()))
            log.info(
                "batches pending=%d done=%d rows pending=%d done=%d request_counts completed/total=%d/%d",
                len(pending), self.landed, rows, self.run.totals["embedded"], completed, total,
            )  # fmt: skip
            if not pending:
                return
            time.sleep(self.run.settings.poll_seconds)

    def check(self, record: Record) -> None:
        with api(f"retrieving batch {record.batch_id}"):
            batch = self.run.client.batches.retrieve(record.batch_id)
        counts = batch.request_counts
        described = counts and f"{counts.completed}/{counts.total} failed={counts.failed}"
        if batch.status not in ENDED:
            self.counts[record.key] = (counts.completed, counts.total) if counts else (0, 0)
            self.run.update(record.key, state=batch.status, request_counts=described)
            return
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                self.land(record.key, file_id, batch.input_file_id)
        self.counts.pop(record.key, None)
        left = [row[0] for row in self.run.execute("batch/batch_rows_text", key=record.key, row_ids=None).fetchall()]
        if left and batch.status in ("expired", "failed") and record.attempts < 2:
            log.warning("batch %s %s: submitting its %d rows left again", batch.id, batch.status, len(left))
            self.run.update(
                record.key, attempts=record.attempts + 1, batch_id=None, input_file_id=None, state="submitting"
            )
            self.run.create(record.key, record.attempts + 1)
            return
        if left and batch.status in ("expired", "failed"):
            reason = f"batch {batch.id} {batch.status} on attempt {record.attempts}"
            self.run.store.record_failures([(row_id, reason, record.attempts) for row_id in left])
            self.run.totals["failed"] += len(left)
        self.run.release(record.key)  # rows of a completed or cancelled batch left NULL: a later run takes them
        state = {"completed": "landed", "cancelled": "cancelled"}.get(batch.status, "failed")
        self.run.update(record.key, state=state, request_counts=described)
        self.landed += 1
        log.info("batch %s %s: %s", record.key, batch.status, state)

    def land(self, key: str, file_id: str, input_file_id: str) -> None:
        """Place every vector of an output (or error) file by custom_id and index, a chunk per commit."""
        places = {(request, position): (row_id, digest) for request, position, row_id, digest in self.run.execute(
            "batch/batch_places", key=key)}  # fmt: skip
        self.run.conn.rollback()
        if any(digest is None for _, digest in places.values()):
            self._vouch(key, input_file_id, places)
        ids, vectors, refused = [], [], {}
        with api(f"reading file {file_id}"), self.run.client.files.with_streaming_response.content(file_id) as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                request = int(item["custom_id"].rsplit(":", 1)[1])
                answer, error = item.get("response") or {}, item.get("error") or {}
                if answer.get("status_code") == 200 and not error:
                    body = answer["body"]
                    self.run.totals["tokens"] += int((body.get("usage") or {}).get("prompt_tokens") or 0)
                    self.run.totals["requests"] += 1
                    for data in body["data"]:
                        place = places.pop((request, data["index"]), None)
                        if place is not None:  # None: landed before a kill
                            ids.append(place)
                            vectors.append(decode_vector(data["embedding"]))
                    if len(ids) >= LAND_CHUNK_ROWS:
                        self.write(key, ids, vectors)
                        ids, vectors = [], []
                elif error.get("code") not in GIVEN_UP:
                    refused[request] = error.get("message") or ((answer.get("body") or {}).get("error") or {}).get(
                        "message"
                    )
        self.write(key, ids, vectors)
        if refused:
            row_ids = [row_id for (request, _), (row_id, _) in places.items() if request in refused]
            log.warning("%d rows in %d refused requests of the batch: sending them through the normal endpoint "
                        "(first reason: %s)", len(row_ids), len(refused), next(iter(refused.values())))  # fmt: skip
            self.resend(key, row_ids)

    def _vouch(self, key: str, input_file_id: str, places: dict[tuple[int, int], Place]) -> None:
        """The rows that kept no hash of their text (a batch submitted before schema 2): the text
        sent is read back from the batch's input file; a row whose text is still that one is given
        its hash now (the write checks it), a row edited since is left out (NULL, for a later run)."""
        legacy = {place: row_id for place, (row_id, digest) in places.items() if digest is None}
        sent: dict[tuple[int, int], str] = {}
        with (
            api(f"reading file {input_file_id}"),
            self.run.client.files.with_streaming_response.content(input_file_id) as response,
        ):
            for line in response.iter_lines():
                if line.strip():
                    item = json.loads(line)
                    request = int(item["custom_id"].rsplit(":", 1)[1])
                    sent.update(((request, n), text) for n, text in enumerate(item["body"]["input"]))
        now = self.run.execute("batch/batch_rows_text", key=key, row_ids=list(legacy.values())).fetchall()
        self.run.conn.rollback()
        texts = {row_id: (digest, row_text(values)) for row_id, _, digest, *values in now}
        limit = self.run.settings.input_token_limit
        for place, row_id in legacy.items():
            digest, text = texts.get(row_id, (None, None))
            if text and sent.get(place) == fit(text, limit, exact=False)[0]:
                places[place] = (row_id, digest)
            else:
                del places[place]  # edited since, or gone: its vector is not written
                log.info("row %s changed since its batch was submitted: its vector is not written", row_id)

    def write(self, key: str, places: list[Place], vectors: list[np.ndarray], failures: Sequence[Failure] = ()) -> None:
        """Write vectors where each row is still NULL with the text that was sent, record failures,
        take the rows out of the batch, commit. `places`: [(row_id, text hash)], one per vector."""
        ids, hashes = [row_id for row_id, _ in places], [digest for _, digest in places]
        matrix = None
        if ids:
            matrix = np.vstack(vectors)
            error = self.run.target.width_error(self.run.settings, matrix.shape[1])
            if error:
                raise FatalProviderError(error)
        self.run.release(key, ids + [row_id for row_id, _, _ in failures])
        written, failed, _ = self.run.store.write(ids, hashes, matrix, failures)
        self.run.totals["embedded"] += written
        self.run.totals["failed"] += len(failed)
        for row_id, reason, _ in failed:
            log.warning("row %s failed: %s", row_id, reason)

    def resend(self, key: str, row_ids: list[str]) -> None:
        """Rows of requests the batch refused, through the normal endpoint and the backfill's own
        request path (its retries, its split to isolate the rows refused)."""
        rows = self.run.execute("batch/batch_rows_text", key=key, row_ids=row_ids).fetchall()
        self.run.conn.rollback()
        texts = [(row_id, now, row_text(values)) for row_id, _, now, *values in rows]  # sent as they are now
        hashes = {row_id: digest for row_id, digest, _ in texts}
        limit = self.requester().input_limit()
        fitted = [Row(row_id, *fit(text, limit)[:2]) for row_id, _, text in texts if text]
        embedded, failures = self.requester().embed(fitted)
        failures += [(row_id, "empty text", 1) for row_id, _, text in texts if not text]
        places = [(row.row_id, hashes[row.row_id]) for chunk, _ in embedded for row in chunk]
        self.write(key, places, [vectors for _, vectors in embedded], failures)

    def requester(self) -> Requester:
        """The request path of a backfill, in this process (no pool): for the few rows a batch refused."""
        run = self.run
        if run.requester is None:
            from .providers import make_embedder

            context = multiprocessing.get_context("fork")
            shared = SharedState(context, 1)
            shared.register_worker()
            limiter = RateLimiter(context, run.settings.rpm, run.settings.tpm, 1)
            embedder = make_embedder(run.settings, run.target.dimensions)
            run.requester = Requester(run.settings, embedder, shared, limiter, context.Semaphore(1), run.shape)
        return run.requester
