-- The rows nearest to a query vector by cosine distance.
SELECT {id}::text, {text_columns}, {embedding} <=> %(query)s AS distance
FROM {table}
WHERE {embedding} IS NOT NULL
ORDER BY {embedding} <=> %(query)s
LIMIT %(top)s;
