-- Before a batch's file is built (again): no row has a place yet.
UPDATE etl_batch_rows SET request = NULL, position = NULL
WHERE table_name = %(table_name)s AND batch_key = %(key)s;
