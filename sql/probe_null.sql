-- `--follow`: is there a row to embed now? One row through the partial index, not a count.
-- Rows the ledger holds as failed are skipped as a run skips them, or a follower would wake
-- for them forever.
SELECT 1 FROM {table} t
WHERE t.{embedding} IS NULL AND t.{id} IS NOT NULL
  {skip_failures}
LIMIT 1;
