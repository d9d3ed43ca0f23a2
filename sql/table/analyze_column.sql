-- After init --reset-column: fresh statistics of the column, so that the next run's model guard
-- (guard/stats_say_vectors.sql) does not read the vectors that were there as still there.
ANALYZE {table} ({embedding});
