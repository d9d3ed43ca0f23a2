-- After a write that matched fewer rows than were staged: why each staged row was not written.
-- The claim holds the rows' locks, so this is rare. 'deleted' (no such row now) and 'filled'
-- (the row holds another vector) are fine; 'null' means something on the table (a trigger, a
-- rule, a row-level security policy) skipped the update; 'unmatched' means the id does not
-- come back from its text form. Runs only on that rare path: the EXISTS may scan the table.
SELECT s.row_id,
       CASE WHEN t.{id} IS NOT NULL AND t.{embedding} IS NULL THEN 'null'
            WHEN t.{id} IS NOT NULL THEN 'filled'
            WHEN EXISTS (SELECT 1 FROM {table} u WHERE u.{id}::text = s.row_id) THEN 'unmatched'
            ELSE 'deleted' END
FROM etl_stage s
LEFT JOIN {table} t ON t.{id} = s.row_id::{id_type}
WHERE t.{id} IS NULL OR t.{embedding} IS DISTINCT FROM s.embedding;
