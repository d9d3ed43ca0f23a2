-- Schema 1: the tables of the tool before schema versions existed (every statement idempotent, so
-- that a database made by an older tool is brought to this version as it is).
--
-- The failure ledger: one row per table row that could not be embedded.
-- A plain rerun skips these rows; --retry-failed takes them again, and a row that later
-- succeeds is removed.
CREATE TABLE IF NOT EXISTS etl_failures (
    table_name  text        NOT NULL,
    row_id      text        NOT NULL,
    reason      text        NOT NULL,
    attempts    int         NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, row_id)
);

-- Runs of etl.py on this database, one row each, kept alive by a lease (lease.py): runs with
-- the same key_hash (a hash of the provider URL and API key, never the key) split their
-- rate-limit budgets between them.
CREATE TABLE IF NOT EXISTS etl_runs (
    run_id      text        PRIMARY KEY,
    key_hash    text        NOT NULL,
    table_name  text        NOT NULL,
    tpm         float8,
    rpm         float8,
    started     timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL
);

-- Vector indexes (HNSW, IVFFlat) that a run with --defer-index dropped before filling the column,
-- recorded in the same transaction as the drop; rebuilt (CREATE INDEX CONCURRENTLY) at the end of
-- the last run on the table, by any later run, or by `init --restore-index`, and then deleted.
CREATE TABLE IF NOT EXISTS etl_deferred_indexes (
    table_name  text        NOT NULL,
    schema_name text        NOT NULL,
    index_name  text        NOT NULL,
    definition  text        NOT NULL,
    dropped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schema_name, index_name)
);

-- What each filled column holds (catalog.guard_column): the model, dimensions, provider (the
-- base URL's host, never the key) and text recipe (the text columns, in order) of the first
-- run that wrote into it. A run that would add vectors of another kind is refused before its
-- first request; `etl.py init --reset-column --yes` clears the column and this record.
-- origin_unknown: the column already held vectors when the tool first saw it.
CREATE TABLE IF NOT EXISTS etl_columns (
    table_name     text        NOT NULL,
    column_name    text        NOT NULL,
    model          text        NOT NULL,
    dimensions     int,
    provider       text        NOT NULL,
    recipe         text[]      NOT NULL,
    origin_unknown boolean     NOT NULL DEFAULT false,
    recorded       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, column_name)
);

-- --batch-api (batchapi.py): one row per batch submitted to OpenAI's Batch API, recorded
-- before the batch is created (its key is also in the batch's metadata), so that a rerun after
-- a kill finds it instead of paying for its rows twice. state: submitting (no batch id yet),
-- the batch's own status while it is pending, then landed, failed or cancelled.
CREATE TABLE IF NOT EXISTS etl_batches (
    key             text        PRIMARY KEY,
    table_name      text        NOT NULL,
    input_file_id   text,
    batch_id        text,
    state           text        NOT NULL DEFAULT 'submitting',
    row_count       int         NOT NULL,
    attempts        int         NOT NULL DEFAULT 1,
    request_counts  text,
    created         timestamptz NOT NULL DEFAULT now(),
    updated         timestamptz NOT NULL DEFAULT now()
);

-- The rows of the pending batches: a run skips them. `request` and `position` place each
-- vector of the batch's output (custom_id and index); a row leaves when its vector lands.
CREATE TABLE IF NOT EXISTS etl_batch_rows (
    table_name  text NOT NULL,
    row_id      text NOT NULL,
    batch_key   text NOT NULL,
    request     int,
    position    int,
    PRIMARY KEY (table_name, row_id)
);
CREATE INDEX IF NOT EXISTS etl_batch_rows_key_idx ON etl_batch_rows (batch_key, request, position);
