-- What may still write into a table's column: runs with a live lease, and --batch-api batches
-- that have not ended here.
SELECT (SELECT count(*) FROM etl_runs WHERE table_name = %(table_name)s AND lease_until > now()),
       (SELECT count(*) FROM etl_batches
        WHERE table_name = %(table_name)s AND state NOT IN ('landed', 'failed', 'cancelled'));
