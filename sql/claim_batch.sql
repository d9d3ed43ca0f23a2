-- Claim the next batch of a worker's id range: keyset paging (never OFFSET) over the
-- partial index, in id order.
--
-- Locking: FOR UPDATE SKIP LOCKED row-locks exactly the rows returned and skips rows that
-- another transaction holds. A second run on the same table (or a worker whose range was
-- cut badly) therefore never receives a row that is being embedded right now; the lock is
-- held until this worker commits its write or its connection dies (then PostgreSQL rolls
-- back and the row is simply NULL again for the next run). Rows skipped here are behind the
-- keyset cursor, which is safe: whoever holds them writes them.
--
-- The skip_failures slot below is either empty (--retry-failed) or the anti-join against
-- the failure ledger (sql/skip_failures.sql). The skip_batched slot is empty unless the table
-- had rows in a pending --batch-api batch when the connection was opened (sql/skip_batched.sql).
SELECT t.{id}::text AS row_id, {text_columns}
FROM {table} t
WHERE t.{embedding} IS NULL
  AND (%(after)s::{id_type} IS NULL OR t.{id} > %(after)s::{id_type})
  AND (%(upto)s::{id_type} IS NULL OR t.{id} <= %(upto)s::{id_type})
  AND t.{id} IS NOT NULL
  {skip_failures}
  {skip_batched}
ORDER BY t.{id}
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;
