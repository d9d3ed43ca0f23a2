-- The rows of one batch still waiting for their vector, by their place in its file.
SELECT request, position, row_id FROM etl_batch_rows
WHERE table_name = %(table_name)s AND batch_key = %(key)s AND request IS NOT NULL;
