-- The columns of one table with their types; %(relation)s is a quoted, qualified name.
SELECT a.attname,
       format_type(a.atttypid, a.atttypmod) AS type_sql,
       t.typname,
       a.atttypmod,
       n.nspname || '.' || c.relname          AS qualified_name,
       c.relkind = 'p'                        AS partitioned
FROM pg_attribute a
JOIN pg_type t      ON t.oid = a.atttypid
JOIN pg_class c     ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE a.attrelid = to_regclass(%(relation)s)
  AND a.attnum > 0
  AND NOT a.attisdropped
ORDER BY a.attnum;
