-- Rows still to embed, through the partial index when it exists. Never the whole table.
SELECT count(*) FROM {table} WHERE {embedding} IS NULL;
