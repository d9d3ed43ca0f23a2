-- `verify --sample N`: N random rows that hold a vector. The ids are drawn first, so the sort
-- carries ids, not vectors; the rows are then read in id order.
SELECT t.{id}::text AS row_id, {text_columns}, t.{embedding}
FROM {table} t
JOIN (SELECT {id} FROM {table} WHERE {embedding} IS NOT NULL ORDER BY random() LIMIT %(limit)s) s
  ON s.{id} = t.{id}
ORDER BY t.{id};
