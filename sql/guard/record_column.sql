-- The first run that writes into a column records what it writes, held for it (claimed_by) until
-- its first vectors confirm the record (sql/guard/confirm_column.sql). Two runs starting together both
-- try: the primary key lets exactly one row in, and each then compares itself with that row. A
-- record held by a run whose lease has run out (it died before writing anything) is replaced.
-- RETURNING tells the run whether its own row is the one that got in.
INSERT INTO etl_columns AS c (table_name, column_name, model, dimensions, provider, recipe, extra_body, origin_unknown,
                               claimed_by, id_column)
VALUES (%(table_name)s, %(column_name)s, %(model)s, %(dimensions)s, %(provider)s, %(recipe)s, %(extra_body)s,
        %(origin_unknown)s, %(claimed_by)s, %(id_column)s)
ON CONFLICT (table_name, column_name) DO UPDATE
SET model = EXCLUDED.model, dimensions = EXCLUDED.dimensions, provider = EXCLUDED.provider,
    recipe = EXCLUDED.recipe, extra_body = EXCLUDED.extra_body, origin_unknown = EXCLUDED.origin_unknown, claimed_by = EXCLUDED.claimed_by,
    id_column = EXCLUDED.id_column,
    recorded = now()
WHERE c.claimed_by IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM etl_runs r WHERE r.run_id = c.claimed_by AND r.lease_until > now())
RETURNING true;
