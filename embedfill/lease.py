"""A run's lease: its row in etl_runs, renewed every few seconds by the run's parent, is what keeps
the run's claims (etl_claims) and its not yet confirmed column record alive, and how runs on one
API key share its quota through PostgreSQL, the one thing all their hosts reach. No coordinator:
a run that ends deletes its row, its claims and its unconfirmed record; a run that dies, or is cut
off from the database, stops renewing, and within LEASE_SECONDS its rows are free for others and
its share of --max-tokens-per-minute and --max-requests-per-minute goes to the runs left.

The renewal never makes the parent wait: it goes through an asynchronous connection that the
parent's loop drives a step at a time (`tick`), so that a database that hangs stops neither the
progress lines nor the answer to a signal."""

import hashlib
import logging
import math
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions

from . import db
from .errors import EtlError
from .providers import make_provider

if TYPE_CHECKING:
    from .ratelimit import RateLimiter
    from .settings import Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0
RENEW_SECONDS = 2.0
STEP_SECONDS = 10.0  # a renewal that has not completed by then is abandoned and started again
SERVE_TABLES = "*"  # the table_name of a `serve` lease: every tracked column


def key_hash(settings: "Settings") -> str:
    """The provider's quota identity, a hash of its URL and key: runs compare it; nobody can read the key back."""
    return make_provider(settings).quota_key


def namespace() -> str:
    """Who can see this process's pid: the machine's boot and the pid namespace, hashed (a run_id
    of the same host name in another container, with host networking, is not ours to judge)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            seen = boot.read().strip() + str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS): the host name alone tells
        seen = ""
    return hashlib.sha256(seen.encode()).hexdigest()[:8]


def end_dead_runs(conn: db.Connection) -> None:
    """End the leases of this host's runs whose process is gone (a kill -9, an OOM kill): their
    claims are free at once, not LEASE_SECONDS later. A run of another host, or of another pid
    namespace of this one, keeps its lease."""
    here = f"{socket.gethostname()}:"
    with conn.cursor() as cur:
        cur.execute(db.load_sql("lease/live_runs"))
        dead = [run_id for (run_id,) in cur.fetchall() if run_id.startswith(here) and _gone(run_id[len(here) :])]
        for run_id in dead:
            log.info("run %s is gone (its process is no more): its claims are free", run_id)
            cur.execute(db.load_sql("lease/end_lease"), {"run_id": run_id})
    conn.commit()


def _gone(rest: str) -> bool:
    pid, _, seen = rest.partition(":")
    if not pid.isdigit() or int(pid) == os.getpid() or not seen.startswith(f"{namespace()}."):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Beat:
    """A statement sent every RENEW_SECONDS through an asynchronous connection that the parent's loop
    drives a step at a time (`tick`): it never waits on the database. `answered` gets the first
    column of its row; `answered_at` says when the database last answered."""

    def __init__(self, database_url: str | None, statement: str, params: dict[str, Any] | None = None) -> None:
        self.database_url, self.statement, self.params = database_url, statement, params or {}
        self.sent_at = -RENEW_SECONDS
        self.answered_at = -math.inf
        self.conn: db.Connection = None  # the asynchronous connection, and the statement sent on it
        self.cursor: db.Cursor = None
        self.pending = False  # a round is under way
        self.began = 0.0

    def tick(self) -> None:
        """Take the round one step further, every RENEW_SECONDS. A database that does not answer costs
        nothing here: the round is abandoned after STEP_SECONDS and started again."""
        now = time.monotonic()
        try:
            if not self.pending:
                if now - self.sent_at < RENEW_SECONDS:
                    return
                self.pending, self.sent_at, self.began = True, now, now
                if self.conn is None:
                    self.conn = db.connect(self.database_url, async_=True)
            if now - self.began > STEP_SECONDS:
                raise TimeoutError(f"no answer within {STEP_SECONDS:g} s")
            if self.conn.poll() != psycopg2.extensions.POLL_OK:
                return
            if self.cursor is None:  # connected (or idle since the last round): send it
                self.cursor = self.conn.cursor()
                self.cursor.execute(self.statement, self.params)
                return
            value = self.cursor.fetchone()[0]
            self.cursor, self.pending, self.answered_at = None, False, time.monotonic()
            self.answered(value)
        except (psycopg2.Error, EtlError, TimeoutError) as error:
            log.debug("no answer from the database: %s", db.first_line(error))
            self.close()

    def answered(self, value: Any) -> None:
        """What to do with the answer (nothing: a heartbeat)."""

    def close(self) -> None:
        """Drop the round under way (before a fork: no socket crosses it)."""
        if self.conn is not None:
            self.conn.close()
        self.conn = self.cursor = None
        self.pending = False


class Lease(Beat):
    """This run's row in etl_runs, renewed by `tick`; tells the limiter its share."""

    def __init__(self, settings: "Settings", table_name: str, limiter: "RateLimiter") -> None:
        """`table_name`: the table the run fills (serve's lease says SERVE_TABLES)."""
        self.settings = settings
        self.limiter = limiter
        self.run_id = f"{socket.gethostname()}:{os.getpid()}:{namespace()}.{secrets.token_hex(3)}"
        params = {
            "run_id": self.run_id,
            "key_hash": key_hash(settings),
            "table_name": table_name,
            "tpm": settings.tpm,
            "rpm": settings.rpm,
            "lease_seconds": LEASE_SECONDS,
        }
        super().__init__(settings.database_url, db.load_sql("lease/renew_lease"), params)
        self.runs = 1

    def renew(self) -> None:
        """Renew now, waiting for the database (before the workers start: their share is known)."""
        conn = db.connect(self.settings.database_url)
        try:
            with conn.cursor() as cur:
                cur.execute(self.statement, self.params)
                runs = cur.fetchone()[0]
            conn.commit()
        finally:
            conn.close()
        self.sent_at = self.answered_at = time.monotonic()
        self._share(runs)

    def answered(self, value: Any) -> None:
        self._share(value)

    def _share(self, runs: int) -> None:
        self.limiter["renewed_at"] = time.monotonic()  # the workers claim while this is fresh
        if runs != self.runs:
            log.log(
                logging.INFO if self.settings.tpm or self.settings.rpm else logging.DEBUG,
                "%d runs share this API key's quota now: each uses 1/%d of the configured budgets",
                runs,
                runs,
            )
        self.runs = runs
        self.limiter.set_share(runs)

    def release(self) -> None:
        """Delete this run's row, its claims and its unconfirmed column record: others take its rows
        and its share at once."""
        self.close()
        try:
            conn = db.connect(self.settings.database_url, timeout=3)
            try:
                with conn.cursor() as cur:
                    cur.execute(db.load_sql("lease/end_lease"), self.params)
                conn.commit()
            finally:
                conn.close()
        except (psycopg2.Error, EtlError) as error:
            log.debug("could not end this run's lease: %s", db.first_line(error))
