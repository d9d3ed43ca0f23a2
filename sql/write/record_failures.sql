-- Record rows that could not be embedded (one VALUES list per batch).
INSERT INTO etl_failures (table_name, row_id, reason, attempts)
VALUES %s
ON CONFLICT (table_name, row_id) DO UPDATE
SET reason    = EXCLUDED.reason,
    attempts  = etl_failures.attempts + EXCLUDED.attempts,
    last_seen = now();
