-- After a write that left staged rows out (those that do not hold the staged vector now, but for
-- the rows already settled: set back to NULL by a trigger, refused): why each was not written. 'deleted' (no such row
-- now), 'filled' (it holds another vector) and 'changed' (its text was edited while the request
-- was out) are fine: nothing to write. 'null' (still NULL, same text) means the row was held by
-- another transaction, or the table refuses this role's update (row-level security, a rule, a
-- trigger): db.py tells which. 'unmatched' means the id does not come back from its text form.
SELECT s.row_id,
       CASE WHEN t.{id} IS NULL THEN
                CASE WHEN s.row_id::{id_type}::text IS DISTINCT FROM s.row_id
                     THEN 'unmatched' ELSE 'deleted' END
            WHEN t.{embedding} IS NOT NULL THEN 'filled'
            WHEN s.text_hash IS NOT NULL AND {row_hash} IS DISTINCT FROM s.text_hash THEN 'changed'
            ELSE 'null' END
FROM etl_stage s
LEFT JOIN {table} t ON t.{id} = s.row_id::{id_type}
WHERE (t.{id} IS NULL OR t.{embedding} IS DISTINCT FROM s.embedding) AND NOT s.row_id = ANY(%(settled)s);
