-- Runs on this table right now, and their worker processes. Each worker process sets
-- application_name to embedfill:<schema.table>:r<pid of its run>w<N>; a run is a parent pid
-- on one client address.
SELECT count(DISTINCT (client_addr, substring(application_name FROM ':r([0-9]+)w[0-9]+$'))), count(*)
FROM pg_stat_activity
WHERE application_name LIKE %(pattern)s AND pid <> pg_backend_pid();
