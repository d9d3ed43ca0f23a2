-- Schema 2: claims instead of row locks (no lock and no open transaction while a request is out).
--
-- A worker claims a batch here, in a short committed transaction, before it calls the API: one
-- row per batch, the id range [low, high] it took (its first and last id, as text). The claim
-- lives as long as its run's lease in etl_runs (renewed every few seconds by the run's parent),
-- so a run that dies or is cut off from the database lets its rows go within the lease, and
-- nobody waits for a TCP timeout. The row's text hash (computed by PostgreSQL) travels
-- with the batch: the write lands only where the row is still NULL and its text unchanged.
-- UNLOGGED: claims are worthless after a crash (the runs reconnect and claim again), and writing
-- no WAL for them keeps a claim as cheap as the row locks it replaces.
CREATE UNLOGGED TABLE IF NOT EXISTS etl_claims (
    table_name  text        NOT NULL,
    column_name text        NOT NULL,
    run_id      text        NOT NULL,
    low         text        NOT NULL,
    high        text        NOT NULL,
    claimed     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, column_name, run_id, low)
);
CREATE INDEX IF NOT EXISTS etl_claims_run_idx ON etl_claims (run_id);

-- A --batch-api batch keeps the hash of each row's text at submission: a vector that lands a
-- day later is written only if the text is still the one that was sent.
ALTER TABLE etl_batch_rows ADD COLUMN IF NOT EXISTS text_hash bigint;

-- The model guard's record is confirmed by the first write of vectors (in the same transaction):
-- until then it is held by the run that made it (claimed_by), as long as that run's lease lives,
-- so that a run that wrote nothing leaves no record behind.
ALTER TABLE etl_columns ADD COLUMN IF NOT EXISTS claimed_by text;
