-- Move the staged vectors into their rows, in one short transaction once the API has answered.
-- A row is written only while it is still NULL and its text is still the text that was sent (the
-- hash taken at claim time): an edit made while the request was out is never overwritten by the
-- old text's vector, with or without change tracking. FOR NO KEY UPDATE ... SKIP LOCKED: a row
-- the application holds at this moment is left out rather than waited for (db.py looks at it
-- again), so this statement never waits on the application and never deadlocks with it; the
-- application waits on it only for the milliseconds of this write. RETURNING reads each row as it
-- was stored, after the table's own BEFORE triggers: a vector set back to NULL shows as false.
-- A NULL text_hash (a --batch-api batch submitted before schema 2) checks only for NULL.
--
-- The staging table has no statistics, so this transaction turns off hash and merge joins: the
-- plan is a nested loop over the batch with an index probe per row, never a scan of the table.
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
WITH locked AS (
    SELECT s.row_id, s.embedding
    FROM etl_stage s
    JOIN {table} t ON t.{id} = s.row_id::{id_type}
    WHERE t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
    FOR NO KEY UPDATE OF t SKIP LOCKED
)
UPDATE {table} t
SET {embedding} = l.embedding
FROM locked l
WHERE t.{id} = l.row_id::{id_type}
RETURNING l.row_id, t.{embedding} IS NOT NULL;
