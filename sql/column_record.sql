-- What the ledger says a column holds (catalog.column_record).
SELECT model, dimensions, provider, recipe, origin_unknown, to_char(recorded, 'YYYY-MM-DD HH24:MI TZ') AS recorded
FROM etl_columns
WHERE table_name = %(table_name)s AND column_name = %(column_name)s;
