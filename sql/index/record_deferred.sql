-- --defer-index: the definition of an index about to be dropped, committed before the drop, so
-- that it is never lost (the last run on the table rebuilds it from here).
INSERT INTO etl_deferred_indexes (table_name, schema_name, index_name, definition)
VALUES (%(table_name)s, %(schema_name)s, %(index_name)s, %(definition)s)
ON CONFLICT DO NOTHING;
