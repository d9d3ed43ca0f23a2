-- Rows leave their batch: landed, recorded as failed, or the batch ended without them (a
-- NULL row_ids: every row of the batch; unplaced_only: only the rows without a place in its file).
DELETE FROM etl_batch_rows
WHERE table_name = %(table_name)s AND batch_key = %(key)s
  AND (%(row_ids)s::text[] IS NULL OR row_id = ANY(%(row_ids)s::text[]))
  AND NOT (%(unplaced_only)s AND request IS NOT NULL);
