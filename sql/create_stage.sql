-- Per-connection staging table for the binary COPY of one batch; emptied at every commit.
-- {vector_type} is the embedding column's: vector or halfvec.
CREATE TEMP TABLE IF NOT EXISTS etl_stage (row_id text NOT NULL, embedding {vector_type} NOT NULL)
ON COMMIT DELETE ROWS;
