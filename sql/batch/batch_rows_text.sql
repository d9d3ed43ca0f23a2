-- The rows of one batch (or some of them) that are still NULL: the hash of their text at
-- submission (NULL for a batch submitted before schema 2), the hash of their text now, and their
-- texts now. LATERAL keeps the table's own column names apart from etl_batch_rows'.
SELECT b.row_id, b.text_hash, s.*
FROM etl_batch_rows b
CROSS JOIN LATERAL (SELECT {row_hash} AS etl_hash_now, {text_columns} FROM {table} t
                    WHERE t.{id} = b.row_id::{id_type} AND t.{embedding} IS NULL) s
WHERE b.table_name = %(table_name)s AND b.batch_key = %(key)s
  AND (%(row_ids)s::text[] IS NULL OR b.row_id = ANY(%(row_ids)s::text[]))
ORDER BY b.row_id;
