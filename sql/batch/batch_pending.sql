-- The batches of one table that have not ended here yet (landed, failed or cancelled), oldest first.
SELECT key, batch_id, state, row_count, attempts, request_counts,
       extract(epoch FROM created)::float8, date_trunc('second', now() - created)::text
FROM etl_batches
WHERE table_name = %(table_name)s AND state NOT IN ('landed', 'failed', 'cancelled')
ORDER BY created;
