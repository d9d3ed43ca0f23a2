-- `status` with ETL_UPDATED_COLUMN: how long ago the oldest row still to embed was written,
-- by the table's own timestamp column (through the partial index: the NULL rows only).
SELECT date_trunc('second', now() - min({updated}))::text FROM {table} WHERE {embedding} IS NULL;
