-- Move the staged vectors into their rows, in one short transaction once the API has answered.
-- A row is written only while it is still NULL and its text is still the text that was sent (the
-- hash taken at claim time): an edit made while the request was out is never overwritten by the
-- old text's vector, with or without change tracking. RETURNING reads each row as it was stored,
-- after the table's own BEFORE triggers: a vector set back to NULL shows as false. A NULL text_hash
-- (a --batch-api batch submitted before schema 2) checks only for NULL.
--
-- lock_timeout 1ms: this statement never waits on the application. If a row of the batch is held
-- by another transaction right now, it fails at once (55P03) and db.py writes the batch again with
-- sql/write_batch_skip_locked.sql, which leaves such rows out; the application waits on this
-- statement only for the milliseconds it runs.
-- The staging table has no statistics, so this transaction turns off hash and merge joins: the
-- plan is a nested loop over the batch with an index probe per row, never a scan of the table.
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
SET LOCAL lock_timeout = '1ms';
UPDATE {table} t
SET {embedding} = s.embedding
FROM etl_stage s
WHERE t.{id} = s.row_id::{id_type}
  AND t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
RETURNING s.row_id, t.{embedding} IS NOT NULL;
