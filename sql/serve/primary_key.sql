-- `serve`, for a column recorded before etl_columns kept the id column: the table's one-column primary key.
SELECT a.attname
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = to_regclass(%(relation)s) AND i.indisprimary AND i.indnkeyatts = 1;
