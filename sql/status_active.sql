-- Worker processes of runs on this table right now. Each worker's lanes set application_name
-- to embedfill:<schema.table>:w<N>.<lane>; a process counts once whatever its lanes.
SELECT count(DISTINCT regexp_replace(application_name, '\.[0-9]+$', ''))
FROM pg_stat_activity
WHERE application_name LIKE %(pattern)s AND pid <> pg_backend_pid();
