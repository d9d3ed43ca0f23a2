-- One drop or rebuild of a table's vector indexes at a time (--defer-index, its rebuild, init
-- --restore-index): a session-level advisory lock on the table, waited for.
SELECT pg_advisory_lock(%(lock_key)s, hashtext(%(table_name)s));
