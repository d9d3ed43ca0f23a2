-- Rows that have now been embedded leave the ledger.
DELETE FROM etl_failures WHERE table_name = %(table_name)s AND row_id = ANY(%(row_ids)s);
