-- Is there an etl_schema table on the search path? pg_class read through SQL, not to_regclass:
-- after waiting on an advisory lock, a session's catalog cache may not know yet of a table that
-- another session created and committed meanwhile.
SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relname = 'etl_schema' AND n.nspname = ANY (current_schemas(false)));
