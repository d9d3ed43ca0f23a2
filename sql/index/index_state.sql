-- Does the index exist, and is it valid? (An interrupted CREATE INDEX CONCURRENTLY leaves an invalid one.)
SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%(index)s);
