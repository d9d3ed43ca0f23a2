-- `serve`: the columns whose record is confirmed (a write of vectors, or `init --track-changes`,
-- said what they hold); serve keeps those whose change-tracking trigger is installed and enabled.
SELECT table_name, column_name, model, dimensions, provider, recipe, coalesce(extra_body, '') AS extra_body,
       id_column
FROM etl_columns
WHERE claimed_by IS NULL
ORDER BY table_name, column_name;
