-- Is there a row to embed now that no other live run is on? One row through the partial index,
-- not a count. Rows the ledger holds as failed are skipped as a run skips them (or a follower
-- would wake for them forever), and so are rows in a pending --batch-api batch.
SELECT 1 FROM {table} t
WHERE t.{embedding} IS NULL AND t.{id} IS NOT NULL
  {skip_failures}
  {skip_claimed}
LIMIT 1;
