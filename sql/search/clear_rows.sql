-- `verify --fix`: set the mismatched rows' vectors to NULL, so that the next run embeds them
-- again; only where a row still holds the very vector that was checked.
UPDATE {table} t SET {embedding} = NULL
FROM (VALUES %s) AS v(row_id, embedding)
WHERE t.{id} = v.row_id::{id_type} AND t.{embedding} = v.embedding::vector;
