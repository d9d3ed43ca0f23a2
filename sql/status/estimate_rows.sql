-- The planner's row estimate for the table (-1 or 0 when never analyzed): no scan.
SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = to_regclass(%(relation)s);
