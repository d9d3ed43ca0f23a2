"""What `verify` found: each stored vector compared with the fresh embedding of its row's text, and
each mismatch explained (the vector of another row's text, or of no text it was compared with)."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg2.extras

from .db import Connection
from .texts import row_text

if TYPE_CHECKING:
    from multiprocessing.pool import AsyncResult, Pool

    from pgvector import HalfVector, Vector

    from .catalog import Target

SIMILAR = 0.99  # cosine at or above which a stored vector is its text's
NEIGHBOURS = 3  # stored neighbours whose texts are embedded to explain one mismatch
MAX_SEARCHES = 100  # mismatches explained by a kNN query (each reads the table without a vector index)
MAX_MISMATCHES = 1000  # past this the column looks wrong as a whole: stop and say so

# What embedding a page's texts gives: ({row_id: fresh vector}, {row_id: why it was not embedded}).
Fresh = tuple[dict[str, np.ndarray], dict[str, str]]


@dataclass
class Mismatch:
    row_id: str
    stored: "Vector | HalfVector"  # the pgvector Vector read from the row, sent back as is by --fix
    fresh: np.ndarray | None  # the embedding of the row's text now (None: the text is empty)
    source: str | None = None  # the row whose text the stored vector belongs to
    searched: bool = False

    def line(self) -> str:
        if self.source is not None:
            return f"row {self.row_id}: holds the vector of row {self.source}'s text"
        if self.fresh is None:
            return f"row {self.row_id}: holds a vector but its text is empty now"
        where = "" if self.searched else "; not compared with other rows' texts"
        return f"row {self.row_id}: not its text's vector (text edited since, or another model{where})"


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return -1.0
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm else -1.0


class Check:
    """What the comparison found: rows checked, mismatches (with their vectors), rows not embedded."""

    def __init__(self) -> None:
        self.checked = 0
        self.mismatches: list[Mismatch] = []
        self.unchecked: list[tuple[str, str]] = []  # (row_id, reason)

    def compare(self, page: list[tuple[Any, ...]], result: "AsyncResult[Fresh]") -> None:
        fresh, failed = result.get()
        for row_id, *_, stored in page:
            if row_id in failed:
                self.unchecked.append((row_id, failed[row_id]))
                continue
            self.checked += 1
            vector = fresh.get(row_id)
            if vector is None or cosine(stored.to_numpy(), vector) < SIMILAR:
                self.mismatches.append(Mismatch(row_id, stored, vector))

    def explain(
        self,
        conn: Connection,
        target: "Target",
        pool: "Pool",
        batch_size: int,
        embed_texts: Callable[[list[tuple[str, str]]], Fresh],
    ) -> None:
        """Find whose text each mismatched vector is: first among the mismatched rows' own texts
        (two rows swapped), then among its nearest stored neighbours, whose texts are embedded
        (a vector copied from a row that is right)."""
        fresh = {m.row_id: m.fresh for m in self.mismatches if m.fresh is not None}
        self._match(fresh)
        wanted, candidates = [m for m in self.mismatches if m.source is None][:MAX_SEARCHES], {}
        for m in wanted:
            m.searched = True
            with conn.cursor() as cur:
                cur.execute(target.query("search/nearest"), {"query": m.stored, "top": NEIGHBOURS + 1})
                for row_id, *values, distance in cur.fetchall():
                    if row_id not in fresh and distance is not None and distance <= 1 - SIMILAR:
                        candidates[row_id] = row_text(values)
            conn.rollback()
        items = [item for item in candidates.items() if item[1]]
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        for vectors, _ in pool.imap(embed_texts, chunks):
            fresh.update(vectors)
        self._match(fresh)

    def _match(self, fresh: dict[str, np.ndarray]) -> None:
        for m in self.mismatches:
            if m.source is None:
                stored = m.stored.to_numpy()
                m.source = next((i for i, v in fresh.items() if i != m.row_id and cosine(stored, v) >= SIMILAR), None)

    def fix(self, conn: Connection, target: "Target") -> int:
        """Set the mismatched rows to NULL where they still hold the vector that was checked."""
        values = [(m.row_id, m.stored) for m in self.mismatches]
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(
                cur, target.query("search/clear_rows").as_string(conn), values, page_size=max(1, len(values))
            )
            fixed = cur.rowcount if values else 0
        conn.commit()
        return fixed

    def records(self) -> Iterator[dict[str, Any]]:
        """What `lines` says, as dicts for --json."""
        for m in self.mismatches:
            yield {"id": m.row_id, "result": "mismatched", "holds_vector_of": m.source, "explanation": m.line()}
        for row_id, reason in self.unchecked:
            yield {"id": row_id, "result": "unchecked", "holds_vector_of": None, "explanation": reason}

    def lines(self) -> Iterator[str]:
        yield from (m.line() for m in self.mismatches)
        yield from (f"row {row_id}: not checked: {reason}" for row_id, reason in self.unchecked)
