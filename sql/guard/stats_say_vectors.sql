-- Did the last ANALYZE see a vector in the column (null_frac < 1)? NULL when there are no statistics.
SELECT s.null_frac < 1
FROM pg_stats s
JOIN pg_class c     ON c.relname = s.tablename
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname
WHERE c.oid = to_regclass(%(relation)s) AND s.attname = %(column)s;
