-- The demo's table, shaped like the seed's foods, with the comment that marks it as the
-- demo's: demo.py recreates a table of this name only when it carries that comment.
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    category    text,
    description text,
    embedding   vector({dimensions})
);
COMMENT ON TABLE {table} IS {marker};
DELETE FROM etl_failures
WHERE table_name = (SELECT n.nspname || '.' || c.relname FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {name}::regclass);
-- A new table holds no vectors: the next run records its own provider and model.
DELETE FROM etl_columns
WHERE table_name = (SELECT n.nspname || '.' || c.relname FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {name}::regclass);
