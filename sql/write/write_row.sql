-- One row locked by sql/write/lock_row.sql: write it. No row back means a rule or a trigger on the
-- table skipped the update; false means a trigger set the vector back to NULL.
UPDATE {table} t
SET {embedding} = s.embedding
FROM etl_stage s
WHERE s.row_id = %(row_id)s AND t.{id} = s.row_id::{id_type}
RETURNING t.{embedding} IS NOT NULL;
