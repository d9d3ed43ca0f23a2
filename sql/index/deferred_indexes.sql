-- The vector indexes that --defer-index dropped from this table and that wait to be rebuilt.
SELECT schema_name, index_name, definition, now() - dropped_at
FROM etl_deferred_indexes
WHERE table_name = %(table_name)s
ORDER BY index_name;
