-- The rows of a batch about to be submitted, with the hash of each row's text then. A row that
-- another --batch-api run put into its own batch meanwhile is left out (no row back for it).
INSERT INTO etl_batch_rows (table_name, row_id, batch_key, text_hash) VALUES %s
ON CONFLICT (table_name, row_id) DO NOTHING
RETURNING row_id;
