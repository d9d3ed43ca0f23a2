-- The rows of one batch still waiting for their vector, by their place in its file, with the
-- hash of their text at submission.
SELECT request, position, row_id, text_hash FROM etl_batch_rows
WHERE table_name = %(table_name)s AND batch_key = %(key)s AND request IS NOT NULL;
