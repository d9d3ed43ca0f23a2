-- The claims of a batch whose rows were all recorded as failed (nothing to write) leave etl_claims.
DELETE FROM etl_claims
WHERE table_name = %(table_name)s AND column_name = %(column_name)s AND run_id = %(run_id)s
  AND low = ANY(%(lows)s);
