-- The rare path of a write (sql/write/unwritten_rows.sql said 'null'): lock one left-out row, NOWAIT
-- (a row another transaction holds raises at once: it is left for later, never waited for). No
-- row back means row-level security does not let this role update it; true means it may be
-- written now (sql/write/write_row.sql).
SELECT t.{embedding} IS NULL AND (s.text_hash IS NULL OR {row_hash} = s.text_hash)
FROM {table} t
JOIN etl_stage s ON t.{id} = s.row_id::{id_type}
WHERE s.row_id = %(row_id)s
FOR NO KEY UPDATE OF t NOWAIT;
