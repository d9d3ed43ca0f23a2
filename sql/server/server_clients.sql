-- The client connections of the embedded server other than this one, by application name:
-- `etl.py db stop` refuses to end them without --force, and a command that started the server
-- leaves it up at exit while a program other than this tool (psql, Django) is connected.
SELECT coalesce(nullif(application_name, ''), 'unnamed') AS application, count(*)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1
ORDER BY 1;
