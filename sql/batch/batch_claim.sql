-- --batch-api: the next rows to put into a batch, in id order after %(after)s: NULL, not in the
-- failure ledger (unless --retry-failed), not claimed by a live run, not in a pending batch; with
-- the hash of their text (a vector that lands a day later is written only if it is unchanged).
-- No lock: etl_batch_rows' primary key decides between two runs (sql/batch/batch_add_rows.sql).
SELECT t.{id}::text, {row_hash}, {text_columns}
FROM {table} t
WHERE t.{embedding} IS NULL AND t.{id} IS NOT NULL
  AND (%(after)s::{id_type} IS NULL OR t.{id} > %(after)s::{id_type})
  {skip_failures}
  {skip_claimed}
ORDER BY t.{id}
LIMIT %(limit)s;
