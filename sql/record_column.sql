-- The first run that writes into a column records what it writes. Two runs starting together
-- both try: ON CONFLICT DO NOTHING lets exactly one row in, and each then compares itself with
-- that row. RETURNING tells the run whether its own row is the one that got in.
INSERT INTO etl_columns (table_name, column_name, model, dimensions, provider, recipe, origin_unknown)
VALUES (%(table_name)s, %(column_name)s, %(model)s, %(dimensions)s, %(provider)s, %(recipe)s, %(origin_unknown)s)
ON CONFLICT (table_name, column_name) DO NOTHING
RETURNING true;
