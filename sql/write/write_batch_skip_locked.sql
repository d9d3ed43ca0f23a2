-- sql/write/write_batch.sql again, after it met a row held by another transaction: the rows held are
-- left out (FOR NO KEY UPDATE ... SKIP LOCKED) rather than waited for; db.py looks at them one by
-- one (sql/write/unwritten_rows.sql) and leaves them for the next pass. Slower than the plain UPDATE
-- (each row is locked, then updated), so only on that path.
SET LOCAL enable_hashjoin = off;
SET LOCAL enable_mergejoin = off;
SET LOCAL idle_in_transaction_session_timeout = '10s';
SET LOCAL lock_timeout = '10s';  -- the tool's own rows (the column's record) are waited for, not for ever  -- a client cut off before its COMMIT lets go of the rows
WITH released AS (
    DELETE FROM etl_claims
    WHERE table_name = %(table_name)s AND column_name = %(column_name)s AND run_id = %(run_id)s
      AND low = ANY(%(lows)s)
), locked AS (
    SELECT s.row_id, s.embedding, s.text_hash
    FROM etl_stage s
    JOIN {table} t ON t.{id} = s.row_id::{id_type}
    WHERE t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
    FOR NO KEY UPDATE OF t SKIP LOCKED
), written AS (
    UPDATE {table} t
    SET {embedding} = l.embedding
    FROM locked l
    WHERE t.{id} = l.row_id::{id_type}
    RETURNING l.row_id, t.{embedding} IS NOT NULL AS kept, l.text_hash IS NULL OR {row_hash} = l.text_hash AS same
)
SELECT count(*), coalesce(array_agg(row_id) FILTER (WHERE NOT kept), '{{}}'), coalesce(bool_and(same), true)
FROM written;
