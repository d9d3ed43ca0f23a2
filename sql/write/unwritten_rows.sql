-- After a write that left staged rows out (those that do not hold the staged vector now, but for
-- the ones a trigger set back to NULL): why each was not written. 'deleted' (no such row
-- now), 'filled' (it holds another vector) and 'changed' (its text was edited while the request
-- was out) are fine: nothing to write. 'null' (still NULL, same text) means the row was held by
-- another transaction, or the table refuses this role's update (row-level security, a rule, a
-- trigger): db.py tells which. 'unmatched' means the id does not come back from its text form.
-- Runs only on that rare path: the EXISTS may scan the table.
SELECT s.row_id,
       CASE WHEN t.{id} IS NULL THEN
                CASE WHEN EXISTS (SELECT 1 FROM {table} u WHERE u.{id}::text = s.row_id)
                     THEN 'unmatched' ELSE 'deleted' END
            WHEN t.{embedding} IS NOT NULL THEN 'filled'
            WHEN s.text_hash IS NOT NULL AND {row_hash} IS DISTINCT FROM s.text_hash THEN 'changed'
            ELSE 'null' END
FROM etl_stage s
LEFT JOIN {table} t ON t.{id} = s.row_id::{id_type}
WHERE (t.{id} IS NULL OR t.{embedding} IS DISTINCT FROM s.embedding) AND NOT s.row_id = ANY(%(nulled)s);
