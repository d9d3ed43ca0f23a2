-- Claim the next batch of a worker's id range: keyset paging (never OFFSET) over the partial
-- index, in id order, and one row in etl_claims for the id range taken. The caller commits at
-- once, before any request: nothing of the user's table is locked, and no transaction stays open
-- while the API works, so the application never waits on this tool (sql/write/write_batch.sql explains
-- the write).
--
-- Why two runs never pay for one row: a row inside the range of a claim of another run whose
-- lease is alive is not a candidate, and claims of a table are made one at a time: the advisory
-- lock taken first (db.WorkerStore.claim) is held until the claim commits, a few milliseconds, so
-- the claim after it sees this one. A claim of a run whose lease has run out (killed, or cut off
-- from the database) counts for nothing. A row the application inserts into a claimed range while
-- the request is out waits for the next pass or run.
--
-- The skip_failures slot below is either empty (--retry-failed) or the anti-join against the
-- failure ledger (sql/claim/skip_failures.sql). The skip_batched slot is empty unless the table had rows
-- in a pending --batch-api batch when the connection was opened (sql/claim/skip_batched.sql).
-- text_hash is the hash of the row's text columns now: the write lands only where it is unchanged.
WITH candidates AS (
    SELECT t.{id} AS etl_id, t.{id}::text AS row_id, {row_hash} AS text_hash, {claim_texts}
    FROM {table} t
    WHERE t.{embedding} IS NULL
      AND (%(after)s::{id_type} IS NULL OR t.{id} > %(after)s::{id_type})
      AND (%(upto)s::{id_type} IS NULL OR t.{id} <= %(upto)s::{id_type})
      AND t.{id} IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM etl_claims c JOIN etl_runs r ON r.run_id = c.run_id
                      WHERE c.table_name = %(table_name)s AND c.column_name = %(column_name)s
                        AND c.run_id <> %(run_id)s AND r.lease_until > now()
                        AND t.{id} BETWEEN c.low::{id_type} AND c.high::{id_type})
      {skip_failures}
      {skip_batched}
    ORDER BY t.{id}
    LIMIT %(limit)s
), claimed AS (
    INSERT INTO etl_claims (table_name, column_name, run_id, low, high)
    SELECT %(table_name)s, %(column_name)s, %(run_id)s,
           (SELECT row_id FROM candidates ORDER BY etl_id LIMIT 1),
           (SELECT row_id FROM candidates ORDER BY etl_id DESC LIMIT 1)
    WHERE EXISTS (SELECT 1 FROM candidates)
    ON CONFLICT (table_name, column_name, run_id, low) DO UPDATE SET high = EXCLUDED.high
)
SELECT row_id, text_hash, {claimed_texts}
FROM candidates k
ORDER BY etl_id;
