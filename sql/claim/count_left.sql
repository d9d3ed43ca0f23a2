-- At the end of a run: the rows still NULL that no run is on (not in the failure ledger unless
-- --retry-failed, not claimed by another live run, not in a pending --batch-api batch), through
-- the partial index. The summary's still_null.
SELECT count(*) FROM {table} t
WHERE t.{embedding} IS NULL AND t.{id} IS NOT NULL
  {skip_failures}
  {skip_claimed};
