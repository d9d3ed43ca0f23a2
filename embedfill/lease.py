"""Runs that use one API key share its quota, through PostgreSQL, the one thing all their hosts
reach: each run keeps a row in etl_runs alive with a lease, and splits --max-tokens-per-minute
and --max-requests-per-minute by the number of live rows with its key's hash. No coordinator:
a run that ends deletes its row, a run that dies stops renewing it and drops out within
LEASE_SECONDS, and the others take its share."""

import hashlib
import logging
import os
import socket
import time

import psycopg2

from . import db
from .errors import EtlError

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0
RENEW_SECONDS = 2.0


def key_hash(settings):
    """A hash of the provider's URL and the API key: runs compare it; nobody can read the key back."""
    if settings.provider == "azure":
        secret = f"{settings.azure_endpoint}\n{settings.azure_api_key}"
    else:
        secret = f"{settings.base_url or 'https://api.openai.com/v1'}\n{settings.api_key or settings.provider}"
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:32]


class Lease:
    """This run's row in etl_runs, renewed from the parent's loop; tells the limiter its share."""

    def __init__(self, settings, target, limiter):
        self.settings = settings
        self.limiter = limiter
        self.params = {
            "run_id": f"{socket.gethostname()}:{os.getpid()}",
            "key_hash": key_hash(settings),
            "table_name": target.qualified_name,
            "tpm": settings.tpm,
            "rpm": settings.rpm,
            "lease_seconds": LEASE_SECONDS,
        }
        self.conn = None
        self.runs = 1
        self.renewed_at = -RENEW_SECONDS

    def renew(self):
        """Renew the lease every RENEW_SECONDS and set the limiter's share. A database that does
        not answer costs nothing here: the run keeps the share it has, and the lease runs out."""
        if time.monotonic() - self.renewed_at < RENEW_SECONDS:
            return
        self.renewed_at = time.monotonic()
        try:
            if self.conn is None or self.conn.closed:
                self.conn = db.connect(self.settings.database_url)
            with self.conn.cursor() as cur:
                cur.execute(db.load_sql("renew_lease"), self.params)
                runs = cur.fetchone()[0]
            self.conn.commit()
        except (psycopg2.Error, EtlError) as error:
            log.debug("could not renew this run's lease: %s", db.first_line(error))
            self.close()
            return
        if runs != self.runs:
            log.info("%d runs share this API key's quota now: each uses 1/%d of the configured budgets", runs, runs)
        self.runs = runs
        self.limiter.set_share(runs)

    def release(self):
        """Delete this run's row: the others take its share at their next renewal."""
        try:
            if self.conn is None or self.conn.closed:  # a run shorter than RENEW_SECONDS renewed before the fork only
                self.conn = db.connect(self.settings.database_url)
            with self.conn.cursor() as cur:
                cur.execute("DELETE FROM etl_runs WHERE run_id = %(run_id)s", self.params)
            self.conn.commit()
        except (psycopg2.Error, EtlError) as error:
            log.debug("could not end this run's lease: %s", db.first_line(error))
        self.close()

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
