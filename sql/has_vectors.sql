-- Does the column hold any vector yet? Asked once per column, when the tool first sees it.
-- The planner's statistics answer without reading the table once ANALYZE has run (a sample
-- that saw a vector: null_frac < 1); otherwise the search stops at the first vector, under the
-- caller's statement_timeout (a table still all NULL would be read to its end).
SELECT COALESCE(
    (SELECT s.null_frac < 1
     FROM pg_stats s
     JOIN pg_class c     ON c.relname = s.tablename
     JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname
     WHERE c.oid = to_regclass(%(relation)s) AND s.attname = %(column)s),
    EXISTS (SELECT 1 FROM {table} WHERE {embedding} IS NOT NULL));
