-- --index-memory, --index-workers: the session's maintenance_work_mem, max_parallel_maintenance_workers.
SELECT set_config(%(name)s, %(value)s, false);
