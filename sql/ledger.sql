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
