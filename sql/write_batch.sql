-- Move the staged vectors into their rows in one statement. The staging table has no
-- statistics, so the session disables hash and merge joins: the plan is a nested loop
-- over the batch with an index probe per row, instead of a scan of the whole table.
-- "embedding IS NULL" guards against ever overwriting a vector.
UPDATE {table} t
SET {embedding} = s.embedding
FROM etl_stage s
WHERE t.{id} = s.row_id::{id_type}
  AND t.{embedding} IS NULL;
