-- Rows still NULL that the ledger holds as failed: a plain run skips these.
SELECT count(*)
FROM etl_failures f
JOIN {table} t ON t.{id} = f.row_id::{id_type}
WHERE f.table_name = %(table_name)s AND t.{embedding} IS NULL;
