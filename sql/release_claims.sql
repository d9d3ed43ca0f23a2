-- The rows of a batch leave etl_claims in the transaction that writes them (or records them,
-- or gives them up).
DELETE FROM etl_claims
WHERE table_name = %(table_name)s AND column_name = %(column_name)s AND run_id = %(run_id)s
  AND row_id = ANY(%(row_ids)s);
