-- One row, under a savepoint (store.py: a batch the table refused with an error, or whose text a
-- trigger changed in the write, is written again a row at a time). No row back: the row is no
-- longer NULL with the text that was sent, or a rule or trigger skipped the update; kept false: a
-- trigger set the vector back to NULL; same false: a trigger changed the text in the write.
UPDATE {table} t
SET {embedding} = s.embedding
FROM etl_stage s
WHERE s.row_id = %(row_id)s AND t.{id} = s.row_id::{id_type}
  AND t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
RETURNING t.{embedding} IS NOT NULL, s.text_hash IS NULL OR {row_hash} = s.text_hash;
