-- One migration (or init) at a time in a database: a transaction-level advisory lock.
SELECT pg_advisory_xact_lock(%(lock_key)s);
