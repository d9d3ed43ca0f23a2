-- Worker connections of runs on this table right now (workers set application_name to
-- embedfill:<schema.table>:w<N>).
SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %(pattern)s AND pid <> pg_backend_pid();
