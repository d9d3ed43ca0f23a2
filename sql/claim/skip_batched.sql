AND NOT EXISTS (SELECT 1 FROM etl_batch_rows b
                WHERE b.table_name = %(table_name)s AND b.row_id = t.{id}::text)
