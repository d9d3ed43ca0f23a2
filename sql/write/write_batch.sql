-- Move the staged vectors into their rows, in one short transaction once the API has answered,
-- and let the batch's claims go. A row is written only while it is still NULL and its text is
-- still the text that was sent (the hash taken at claim time): an edit made while the request was
-- out is never overwritten by the old text's vector, with or without change tracking. RETURNING
-- reads each row as it was stored, after the table's own BEFORE triggers: a vector set back to
-- NULL shows as not kept, a text the trigger changed as not the same. Returns (rows updated, ids
-- of those a trigger set back to NULL, whether every written row still has the text that was sent:
-- if not, db.py writes the batch again a row at a time).
--
-- lock_timeout 100ms: if a row of the batch is held by another transaction, this statement waits
-- for it at most that long, then fails (55P03) and db.py writes the batch again with
-- sql/write/write_batch_skip_locked.sql, which leaves such rows out; so the application waits on this
-- write only for the milliseconds it runs, and at worst that long. (Not less: waiting for the
-- table to grow is a lock too, and several writers meet on it all the time.)
-- The staging table has no statistics, so this transaction turns off hash and merge joins: the
-- plan is a nested loop over the batch with an index probe per row, never a scan of the table.
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
SET LOCAL idle_in_transaction_session_timeout = '10s';  -- a client cut off before its COMMIT lets go of the rows
SET LOCAL lock_timeout = '100ms';
WITH released AS (
    DELETE FROM etl_claims
    WHERE table_name = %(table_name)s AND column_name = %(column_name)s AND run_id = %(run_id)s
      AND low = ANY(%(lows)s)
), written AS (
    UPDATE {table} t
    SET {embedding} = s.embedding
    FROM etl_stage s
    WHERE t.{id} = s.row_id::{id_type}
      AND t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
    RETURNING s.row_id, t.{embedding} IS NOT NULL AS kept, s.text_hash IS NULL OR {row_hash} = s.text_hash AS same
)
SELECT count(*), coalesce(array_agg(row_id) FILTER (WHERE NOT kept), '{{}}'), coalesce(bool_and(same), true)
FROM written;
