-- The HNSW and IVFFlat indexes that depend on the embedding column (on the column itself or on
-- an expression of it, such as (embedding::halfvec(3072))), with the statement that recreates each.
-- Only valid indexes of a plain table: a partitioned table's index ('I') cannot be rebuilt
-- CONCURRENTLY in one statement, so it is left alone.
SET LOCAL search_path = '';  -- every name in the definitions schema-qualified, as pg_dump writes them
SELECT n.nspname, ci.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index i
JOIN pg_class ci     ON ci.oid = i.indexrelid
JOIN pg_namespace n  ON n.oid = ci.relnamespace
JOIN pg_am am        ON am.oid = ci.relam
JOIN pg_attribute a  ON a.attrelid = i.indrelid AND a.attname = %(embedding_column)s
WHERE i.indrelid = %(table)s
  AND am.amname IN ('hnsw', 'ivfflat')
  AND ci.relkind = 'i'
  AND i.indisvalid
  AND EXISTS (SELECT 1 FROM pg_depend d
              WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum)
ORDER BY ci.relname;
