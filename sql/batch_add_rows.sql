INSERT INTO etl_batch_rows (table_name, row_id, batch_key) VALUES %s;
