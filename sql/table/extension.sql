-- pgvector must be installed in the database; idempotent.
CREATE EXTENSION IF NOT EXISTS vector;
