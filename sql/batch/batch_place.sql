-- Where each row is in the batch's file: custom_id <key>:<request>, `index` <position>.
UPDATE etl_batch_rows b SET request = v.request, position = v.position
FROM (VALUES %s) AS v (table_name, row_id, request, position)
WHERE b.table_name = v.table_name AND b.row_id = v.row_id;
