-- `verify --all`: the next page of rows that hold a vector, by keyset over the id (never OFFSET).
-- ORDER BY t.{id}, qualified: a bare name would sort by the output column of that name, the text.
SELECT t.{id}::text AS row_id, {text_columns}, t.{embedding}
FROM {table} t
WHERE t.{embedding} IS NOT NULL
  AND (%(after)s::{id_type} IS NULL OR t.{id} > %(after)s::{id_type})
ORDER BY t.{id}
LIMIT %(limit)s;
