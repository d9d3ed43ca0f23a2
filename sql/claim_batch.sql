-- Claim the next batch of a worker's id range: keyset paging (never OFFSET) over the partial
-- index, in id order, then one row per claimed row in etl_claims. The caller commits at once,
-- before any request: nothing of the user's table is locked, and no transaction stays open while
-- the API works, so the application never waits on this tool (sql/write_batch.sql explains the write).
--
-- Why two runs never pay for one row: a row claimed by another run whose lease is alive is not a
-- candidate; two runs that pick the same candidate at the same moment meet on etl_claims' primary
-- key, where the second INSERT waits for the first (a few milliseconds: its transaction only
-- claims), then finds the claim taken and leaves the row out (ON CONFLICT ... WHERE false). A claim
-- of this run (a batch walked again after a lost connection) or of a run whose lease has run out
-- (killed, or cut off from the database) is taken over. Rows are inserted in id order, so two
-- claims can wait on each other but never deadlock.
--
-- The skip_failures slot below is either empty (--retry-failed) or the anti-join against the
-- failure ledger (sql/skip_failures.sql). The skip_batched slot is empty unless the table had rows
-- in a pending --batch-api batch when the connection was opened (sql/skip_batched.sql).
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
                        AND c.row_id = t.{id}::text AND c.run_id <> %(run_id)s AND r.lease_until > now())
      {skip_failures}
      {skip_batched}
    ORDER BY t.{id}
    LIMIT %(limit)s
), claimed AS (
    INSERT INTO etl_claims AS c (table_name, column_name, row_id, run_id)
    SELECT %(table_name)s, %(column_name)s, row_id, %(run_id)s FROM candidates ORDER BY etl_id
    ON CONFLICT (table_name, column_name, row_id) DO UPDATE SET run_id = EXCLUDED.run_id
    WHERE c.run_id = EXCLUDED.run_id
       OR NOT EXISTS (SELECT 1 FROM etl_runs r WHERE r.run_id = c.run_id AND r.lease_until > now())
    RETURNING c.row_id
)
SELECT k.row_id, k.text_hash, {claimed_texts}
FROM candidates k
JOIN claimed USING (row_id)
ORDER BY k.etl_id;
