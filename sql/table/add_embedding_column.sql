-- Used by `etl.py init --dimensions N [--type halfvec]` when the embedding column does not exist yet.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {embedding} {vector_type}({dimensions});
