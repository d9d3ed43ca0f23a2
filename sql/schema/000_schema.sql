-- The schema version of the tool's own tables (etl_*): the number of the last file of
-- sql/schema/ applied. A newer tool applies the files above it, in one transaction under an
-- advisory lock, before it does anything else; an older tool refuses a newer schema.
CREATE TABLE IF NOT EXISTS etl_schema (
    version    int         NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
