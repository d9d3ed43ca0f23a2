-- Rows that hold a vector, for `verify --dry-run` (a scan: only when asked for a plan).
SELECT count(*) FROM {table} WHERE {embedding} IS NOT NULL;
