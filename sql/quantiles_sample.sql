-- Cut points of the ids still to embed, from a block sample of the table. SYSTEM sampling
-- reads only the sampled pages, so its cost follows %(percent)s, not the table size; the
-- quantiles are computed by the server in the column's own sort order (collations
-- included), so they agree with the "id > x" comparisons of the claim query.
SELECT count(*), percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id})::text[]
FROM {table} TABLESAMPLE SYSTEM (%(percent)s)
WHERE {embedding} IS NULL;
