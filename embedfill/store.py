"""The hot path's statements, on one worker's connection: claim a batch, and write it.

A claim is one short committed transaction (the batch's id range in etl_claims); the write is
another, once the API has answered: a binary COPY of the vectors into a per-connection staging
table, then one UPDATE that lands each where the row is still NULL with the text that was sent.
No transaction is open in between, so no row of the user's table is locked while the API works.
"""

import collections
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import numpy as np
import psycopg2
import psycopg2.extras
from psycopg2 import sql

from . import logs
from .columns import copy_chunks
from .db import COPY_CHUNK_BYTES, ChunkReader, Connection, Cursor, first_line, load_sql
from .errors import ConfigError, DatabaseError

if TYPE_CHECKING:
    from .catalog import Target
    from .requester import Failure

log = logging.getLogger(__name__)

CLAIM_KEY = 0x656D6263  # "embc", with the table and column: one claim at a time (sql/claim/claim_lock.sql)

# Why a row the write could not fill is recorded (it would be paid for again on every rerun).
NULLED = "the write was undone: a trigger on the table set the vector back to NULL"
SKIPPED = "the write skipped the row: a rule or a trigger on the table (one that returns NULL)"
HIDDEN = "row-level security does not let this role update the row"
TEXT_CHANGED = "a trigger on the table changes the text when the vector is written: the vector would not be the text's"
# SQLSTATE classes and codes of errors a table raises for some of its rows (a constraint, a trigger's
# RAISE, a policy's WITH CHECK, a value the row cannot take): the batch is written again a row at a time.
ROW_ERRORS = ("23", "22", "P0", "42501", "44000")


class _TextChanged(Exception):
    """The batch's UPDATE met a trigger that changed a row's text: it is written again a row at a time."""


def refuses_rows(error: BaseException) -> bool:
    """Whether a database error may be about some rows of the batch (then each is tried alone)."""
    code = getattr(error, "pgcode", None) or ""
    return any(code.startswith(prefix) for prefix in ROW_ERRORS)


class WorkerStore:
    """One worker's connection and the statements of the hot path: claim (a short committed
    transaction before any request) and write (another, after the answer). No transaction is
    open in between, so no row of the user's table is locked while the API works."""

    def __init__(
        self, conn: Connection, target: "Target", run_id: str, retry_failed: bool, skip_batched: bool | None = None
    ) -> None:
        self.conn = conn
        self.target = target
        self.retry_failed = retry_failed
        self.keys = {"table_name": target.qualified_name, "column_name": target.embedding_column, "run_id": run_id}
        skip = sql.SQL("") if retry_failed else target.query("claim/skip_failures")
        if skip_batched is None:  # rows of pending --batch-api batches: checked once per connection
            skip_batched = self._has_pending_batches()
        batched = target.query("claim/skip_batched") if skip_batched else sql.SQL("")
        claim = target.query("claim/claim_batch", skip_failures=skip, skip_batched=batched).as_string(conn)
        self._claim = load_sql("claim/claim_lock") + claim  # one round trip: the lock, then the claim's own snapshot
        self._writes = [
            target.query(name).as_string(conn) for name in ("write/write_batch", "write/write_batch_skip_locked")
        ]
        self.confirmed = False  # the column's record in etl_columns, once this connection has confirmed it
        with conn.cursor() as cur:
            cur.execute(target.query("write/create_stage"))
        conn.commit()

    def _has_pending_batches(self) -> bool:
        with self.conn.cursor() as cur:
            cur.execute(load_sql("batch/has_rows"), self.keys)
            return cur.fetchone()[0]

    def claim(self, after: str | None, upto: str | None, limit: int) -> list[tuple[Any, ...]]:
        """Claim up to `limit` rows after `after`, up to `upto`: [(row_id, text hash, *texts)], in id
        order, claimed and committed (their id range from the first row's id: what the batch's write
        releases). The claims of a table are made one at a time (a transaction-level advisory lock on
        the table and column, held until the claim commits)."""
        self.conn.autocommit = True  # the lock and the claim: one statement string, one transaction, committed
        try:
            with self.conn.cursor() as cur:
                cur.execute(
                    self._claim, {"after": after, "upto": upto, "limit": limit, "claim_key": CLAIM_KEY, **self.keys}
                )
                return cur.fetchall()
        finally:
            self.conn.autocommit = False

    def write(
        self,
        row_ids: Sequence[str],
        hashes: Sequence[int | None],
        vectors: np.ndarray | None,
        failures: Iterable["Failure"] = (),
        identity: Mapping[str, Any] | None = None,
        lows: Iterable[str] = (),
    ) -> tuple[int, list["Failure"], collections.Counter[str]]:
        """One short transaction: the vectors of `row_ids` where each row is still NULL with the text
        that was sent, the `failures` recorded, the claims starting at `lows` released, then commit.
        A row another transaction holds is never waited for (the batch is written again without it);
        a row the table refuses with an error, or whose text a trigger changes in the write, is
        written again alone and recorded (the rows of a batch are blamed only for themselves).

        Returns (rows written, [(row_id, reason, attempts)] recorded as failed, {state: rows} of rows
        left out for a reason that is not theirs: "deleted", "filled", "changed", "busy")."""
        args = (row_ids, hashes, vectors, list(failures), identity, list(lows))
        try:
            return self._write(self._writes[0], *args)
        except psycopg2.errors.LockNotAvailable:
            self.conn.rollback()
            return self._write(self._writes[1], *args)
        except (psycopg2.Error, _TextChanged) as error:
            if isinstance(error, psycopg2.Error) and not refuses_rows(error):
                raise
            self.conn.rollback()
            return self._write(None, *args)  # a row at a time

    def _write(
        self,
        statement: str | None,
        row_ids: Sequence[str],
        hashes: Sequence[int | None],
        vectors: np.ndarray | None,
        failures: list["Failure"],
        identity: Mapping[str, Any] | None,
        lows: list[str],
    ) -> tuple[int, list["Failure"], collections.Counter[str]]:
        written, failed = 0, failures
        left: collections.Counter[str] = collections.Counter()
        with self.conn.cursor() as cur:
            if row_ids:
                cur.copy_expert(
                    load_sql("write/copy_stage"),
                    ChunkReader(copy_chunks(row_ids, hashes, cast(np.ndarray, vectors), self.target.kind)),
                    size=COPY_CHUNK_BYTES,
                )
                if statement is None:
                    written, nulled, refused = self._write_each(cur, row_ids, lows)
                else:
                    cur.execute(statement, {**self.keys, "lows": lows})  # the claims go in the same statement
                    updated, nulled, same = cur.fetchone()  # what follows may wait 100 ms at most: then the slow path
                    if not same:
                        raise _TextChanged()
                    written, refused = updated - len(nulled), []
                failed += [(row_id, NULLED, 1) for row_id in nulled] + refused
                if written + len(nulled) + len(refused) < len(row_ids):
                    more, blocked = self._unwritten(cur, list(nulled) + [row_id for row_id, _, _ in refused], left)
                    written, failed = written + more, failed + blocked
                if self.retry_failed:
                    cur.execute(
                        load_sql("write/clear_failures"), {"table_name": self.keys["table_name"], "row_ids": row_ids}
                    )
            else:
                cur.execute(load_sql("write/release_claims"), {**self.keys, "lows": lows})
            if identity is not None and written and not self.confirmed:
                self._confirm(cur, identity)
            self.record_failures(failed)
        self.conn.commit()
        self.confirmed = self.confirmed or (identity is not None and written > 0)
        return written, failed, left

    def _write_each(
        self, cur: Cursor, row_ids: Sequence[str], lows: list[str]
    ) -> tuple[int, list[str], list["Failure"]]:
        """The batch a row at a time, each under a savepoint: (written, ids set back to NULL by a
        trigger, [(row_id, reason, 1)] refused by the table). Every row refused with the same
        error is the table's problem, not the rows': the run stops."""
        cur.execute(load_sql("write/release_claims") + load_sql("write/write_each"), {**self.keys, "lows": lows})
        written, nulled, refused, errors = 0, [], [], set()
        for row_id in row_ids:
            cur.execute("SAVEPOINT etl_row")
            try:
                cur.execute(self.target.query("write/write_row"), {"row_id": row_id})
                stored = cur.fetchone()
            except psycopg2.Error as error:
                cur.execute("ROLLBACK TO SAVEPOINT etl_row")
                if not refuses_rows(error):
                    raise
                errors.add(first_line(error))
                refused.append((row_id, f"the table refused the write: {first_line(error)}", 1))
                continue
            if stored is not None and not stored[1]:  # the write changed the text: undone, the row recorded
                cur.execute("ROLLBACK TO SAVEPOINT etl_row")
                refused.append((row_id, TEXT_CHANGED, 1))
                continue
            cur.execute("RELEASE SAVEPOINT etl_row")
            if stored is not None:
                written += stored[0]
                nulled += [] if stored[0] else [row_id]
        if len(row_ids) > 1 and len(refused) == len(row_ids) and len(errors) == 1:
            raise DatabaseError(
                f"{self.target.display} refuses the write of every row of a batch ({errors.pop()}): "
                "a trigger, a constraint or a policy of the table; fix it, then rerun"
            )
        return written, nulled, refused

    def record_failures(self, failures: Sequence["Failure"]) -> None:
        """Add (row_id, reason, attempts) tuples to the ledger (in the open transaction); a reason
        holds a server's or the table's words, so secrets are redacted first."""
        if failures:
            rows = [(self.keys["table_name"], row_id, logs.redact(why)[:2000], n) for row_id, why, n in failures]
            with self.conn.cursor() as cur:
                psycopg2.extras.execute_values(cur, load_sql("write/record_failures"), rows)

    def _unwritten(
        self, cur: Cursor, settled: list[str], left: collections.Counter[str]
    ) -> tuple[int, list["Failure"]]:
        """The rows the write left out, one by one: (rows written after all, rows refused by the table)."""
        cur.execute(self.target.query("write/unwritten_rows"), {"settled": settled})
        written, refused = 0, []
        for row_id, state in cur.fetchall():
            if state == "unmatched":
                raise DatabaseError(
                    f"{self.target.display}.{self.target.id_column} value {row_id!r} does not come back from its text "
                    f"form, so its vector cannot be written; use an id column of integer, bigint, uuid or text"
                )
            if state == "null":
                state = self._write_one(cur, row_id)
            if state in (NULLED, SKIPPED, HIDDEN, TEXT_CHANGED):
                refused.append((row_id, state, 1))
            elif state == "written":
                written += 1
            else:
                left[state] += 1
                log.debug("row %s was %s while it was being embedded; its vector was not written", row_id, state)
        return written, refused

    def _write_one(self, cur: Cursor, row_id: str) -> str:
        """A row still NULL with the same text that the write left out: held by another transaction
        ("busy": left for later, never waited for), or refused by the table (HIDDEN, SKIPPED, NULLED,
        TEXT_CHANGED)."""
        cur.execute("SAVEPOINT etl_row")
        try:
            cur.execute(self.target.query("write/lock_row"), {"row_id": row_id})
            found = cur.fetchone()
        except psycopg2.errors.LockNotAvailable:
            cur.execute("ROLLBACK TO SAVEPOINT etl_row")
            return "busy"
        if found is None:
            cur.execute("RELEASE SAVEPOINT etl_row")
            return HIDDEN
        if not found[0]:
            cur.execute("RELEASE SAVEPOINT etl_row")
            return "changed"
        cur.execute(self.target.query("write/write_row"), {"row_id": row_id})
        stored = cur.fetchone()
        if stored is not None and not stored[1]:
            cur.execute("ROLLBACK TO SAVEPOINT etl_row")
            return TEXT_CHANGED
        cur.execute("RELEASE SAVEPOINT etl_row")
        return SKIPPED if stored is None else "written" if stored[0] else NULLED

    def _confirm(self, cur: Cursor, identity: Mapping[str, Any]) -> None:
        """The first vectors of this connection: the column's record must say what they are (it is made
        at the start of the run, and confirmed here, in the same transaction as the vectors)."""
        host = urlsplit(f"//{identity['provider']}").hostname or identity["provider"]
        cur.execute(load_sql("guard/confirm_column"), {**self.keys, **identity, "provider_host": host})
        if cur.fetchone() is None:
            raise ConfigError(
                f"etl_columns no longer says that {self.target.display}.{self.target.embedding_column} holds "
                f"{identity['model']} vectors (an init --reset-column, or a run of another model?): stopping; "
                "`python etl.py status` shows what it holds"
            )

    def commit(self) -> None:
        self.conn.commit()

    def alive(self) -> bool:
        """Roll back after an error; False when the connection itself is gone."""
        if self.conn.closed:
            return False
        try:
            self.conn.rollback()
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            self.conn.rollback()
            return True
        except psycopg2.Error:
            return False

    def rollback(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.conn.rollback()

    def close(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.conn.close()
