-- Does the id column name exactly one row: a primary key, or a valid unique index that is not
-- partial, has it as its one key column and compares with the column's own collation? And no
-- inheritance children, which a plain table's index does not cover (a partitioned table's
-- does)? Otherwise one row's vector could be written into every row sharing its id.
SELECT EXISTS (
    SELECT 1
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    JOIN pg_class c     ON c.oid = i.indrelid
    WHERE i.indrelid = to_regclass(%(relation)s)
      AND a.attname = %(id_column)s
      AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indnkeyatts = 1
      AND i.indcollation[0] = a.attcollation
      AND NOT (c.relkind = 'r' AND c.relhassubclass)
);
