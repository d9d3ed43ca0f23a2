-- Cut points of the ids still to embed, from a block sample of the table. SYSTEM sampling
-- reads only the sampled pages, so its cost follows %(percent)s, not the table size; the
-- quantiles are computed by the server in the column's own sort order (collations
-- included), so they agree with the "id > x" comparisons of the claim query. The rows of one
-- page are a cluster of neighbouring ids, so the sample's precision follows the number of
-- pages that hold NULL rows (second column), not the number of rows.
SELECT count(*),
       count(DISTINCT (ctid::text::point)[0]),
       percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY {id})::text[]
FROM {table} TABLESAMPLE SYSTEM (%(percent)s)
WHERE {embedding} IS NULL;
