-- The batch's vectors, in the binary COPY format (store.copy_chunks), into the staging table.
COPY etl_stage (row_id, text_hash, embedding) FROM STDIN WITH (FORMAT binary);
