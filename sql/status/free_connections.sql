-- Connections a run can still open: the server's (max_connections less the reserved slots and
-- the client backends now), the role's and the database's connection limits (-1: none).
SELECT current_setting('max_connections')::int
         - current_setting('superuser_reserved_connections')::int
         - coalesce(current_setting('reserved_connections', true)::int, 0)
         - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       current_setting('max_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       (SELECT CASE WHEN rolconnlimit < 0 THEN NULL
                    ELSE rolconnlimit - (SELECT count(*) FROM pg_stat_activity WHERE usename = current_user) END
        FROM pg_roles WHERE rolname = current_user),
       (SELECT CASE WHEN datconnlimit < 0 THEN NULL
                    ELSE datconnlimit - (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) END
        FROM pg_database WHERE datname = current_database());
