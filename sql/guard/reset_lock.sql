-- init --reset-column: held (session level) while it clears the column; a run that starts meanwhile refuses.
SELECT pg_try_advisory_lock(%(lock_key)s, hashtext(%(table_name)s));
