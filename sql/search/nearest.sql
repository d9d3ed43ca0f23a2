-- The rows nearest to a query vector by cosine distance.
-- The query is cast to the column's type (vector or halfvec), so that an HNSW index on it is used.
SELECT {id}::text, {text_columns}, {embedding} <=> %(query)s::{vector_type} AS distance
FROM {table}
WHERE {embedding} IS NOT NULL
ORDER BY {embedding} <=> %(query)s::{vector_type}
LIMIT %(top)s;
