AND NOT EXISTS (SELECT 1 FROM etl_failures f
                WHERE f.table_name = %(table_name)s AND f.row_id = t.{id}::text)
