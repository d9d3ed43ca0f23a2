-- Is there an index whose first key is the id column and whose predicate is
-- "<embedding> IS NULL"? Quotes are stripped so that quoted and plain names compare equal.
SELECT ci.relname
FROM pg_index i
JOIN pg_class ci     ON ci.oid = i.indexrelid
JOIN pg_attribute a  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = to_regclass(%(relation)s)
  AND a.attname = %(id_column)s
  AND i.indpred IS NOT NULL
  AND replace(pg_get_expr(i.indpred, i.indrelid), '"', '') = '(' || %(embedding_column)s || ' IS NULL)'
LIMIT 1;
