AND NOT EXISTS (SELECT 1 FROM etl_claims c JOIN etl_runs r ON r.run_id = c.run_id
                WHERE c.table_name = %(table_name)s AND c.column_name = %(column_name)s
                  AND c.run_id <> %(run_id)s AND r.lease_until > now()
                  AND t.{id} BETWEEN c.low::{id_type} AND c.high::{id_type})
AND NOT EXISTS (SELECT 1 FROM etl_batch_rows b WHERE b.table_name = %(table_name)s AND b.row_id = t.{id}::text)
