-- The claims of a batch leave etl_claims in the transaction that writes it (or records its rows,
-- or gives them up); lock_timeout goes back to the session's (sql/write_batch.sql set it for the UPDATE).
SET LOCAL lock_timeout TO DEFAULT;
DELETE FROM etl_claims
WHERE table_name = %(table_name)s AND column_name = %(column_name)s AND run_id = %(run_id)s
  AND low = ANY(%(lows)s);
