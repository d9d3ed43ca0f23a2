-- Per-connection staging table for the binary COPY of one batch; emptied at every commit.
-- {vector_type} is the embedding column's: vector or halfvec. text_hash is the hash of the row's
-- text at claim time (sql/claim/claim_batch.sql), checked by the write.
-- toast_tuple_target at its largest: a staged vector stays in its row (pgvector's types are stored
-- out of line past 2 kB), so the COPY does not cut it into TOAST chunks that the write then reads
-- back (a tenth or more of the database's CPU a row at 1536 dimensions); a row too long for a page
-- is still stored out of line.
CREATE TEMP TABLE IF NOT EXISTS etl_stage (row_id text NOT NULL, text_hash bigint, embedding {vector_type} NOT NULL)
WITH (toast_tuple_target = 8160) ON COMMIT DELETE ROWS;
