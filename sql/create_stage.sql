-- Per-connection staging table for the binary COPY of one batch; emptied at every commit.
CREATE TEMP TABLE IF NOT EXISTS etl_stage (row_id text NOT NULL, embedding vector NOT NULL)
ON COMMIT DELETE ROWS;
