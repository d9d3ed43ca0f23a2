-- The runs whose lease is alive (lease.end_dead_runs ends those of this host whose process is gone).
SELECT run_id FROM etl_runs WHERE lease_until > now();
