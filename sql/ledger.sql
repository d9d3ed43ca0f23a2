-- The failure ledger: one row per table row that could not be embedded.
-- A plain rerun skips these rows; --retry-failed takes them again, and a row that later
-- succeeds is removed. Created by the tool when missing; idempotent.
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
