-- Cut points of the ids still to embed, read through the partial index. Used when the
-- sample is too thin, that is when the NULL rows are few and this scan is cheap; bounded by
-- %(cap)s ids all the same (the last range then simply holds the rest).
SELECT count(*), percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id})::text[]
FROM (SELECT {id} FROM {table} WHERE {embedding} IS NULL ORDER BY {id} LIMIT %(cap)s) AS s;
