-- The table's size in pages, from its file size: no scan, and right even before ANALYZE.
SELECT pg_relation_size(to_regclass(%(relation)s)) / current_setting('block_size')::bigint;
