-- Per-connection staging table for the binary COPY of one batch; emptied at every commit.
-- {vector_type} is the embedding column's: vector or halfvec. text_hash is the hash of the row's
-- text at claim time (sql/claim/claim_batch.sql), checked by the write.
CREATE TEMP TABLE IF NOT EXISTS etl_stage (row_id text NOT NULL, text_hash bigint, embedding {vector_type} NOT NULL)
ON COMMIT DELETE ROWS;
