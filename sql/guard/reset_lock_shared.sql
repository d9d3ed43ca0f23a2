-- A run that is about to write: false while init --reset-column clears the column (guard/reset_lock.sql).
SELECT pg_try_advisory_xact_lock_shared(%(lock_key)s, hashtext(%(table_name)s));
