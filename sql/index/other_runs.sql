-- Other runs on the table whose lease is alive: the last run to finish rebuilds the deferred indexes.
SELECT run_id, lease_until FROM etl_runs
WHERE table_name = %(table_name)s AND lease_until > now() AND run_id <> %(run_id)s;
