SELECT count(*) FROM etl_batch_rows WHERE table_name = %(table_name)s;
