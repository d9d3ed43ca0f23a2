-- Schema 4: `serve` keeps every tracked column filled from what the database records of it; the
-- id column is part of that (NULL in a record made before: serve takes the table's primary key).
ALTER TABLE etl_columns ADD COLUMN IF NOT EXISTS id_column text;
