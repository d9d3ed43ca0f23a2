-- The tool's own tables (etl_*) on the search path, oldest first: `init` says which ones it created.
SELECT c.relname
FROM pg_class c
WHERE c.relkind IN ('r', 'p') AND c.relname LIKE 'etl\_%' AND pg_table_is_visible(c.oid)
ORDER BY c.oid;
