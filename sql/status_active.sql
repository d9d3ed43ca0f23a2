-- Worker processes of runs on this table right now. Each worker's lanes set application_name
-- to embedfill:<schema.table>:w<N>p<pid>.<lane>; a process counts once whatever its lanes,
-- and two runs at once count apart (their workers have different pids).
SELECT count(DISTINCT regexp_replace(application_name, '\.[0-9]+$', ''))
FROM pg_stat_activity
WHERE application_name LIKE %(pattern)s AND pid <> pg_backend_pid();
