SELECT pg_advisory_unlock(%(lock_key)s, hashtext(%(table_name)s));
