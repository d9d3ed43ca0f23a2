-- index/lock.sql without waiting: false when another process drops or rebuilds this table's indexes.
SELECT pg_try_advisory_lock(%(lock_key)s, hashtext(%(table_name)s));
