-- A few rows still to embed, for the token estimate of --dry-run (first ids of the partial index).
SELECT {text_columns} FROM {table} WHERE {embedding} IS NULL LIMIT %(limit)s;
