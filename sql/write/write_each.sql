-- Before a batch is written a row at a time (store.py, each row under a savepoint): the
-- transaction's settings, as sql/write/write_batch.sql has them, without its 100 ms: each row's
-- own lock wait stays short.
SET LOCAL idle_in_transaction_session_timeout = '10s';
SET LOCAL lock_timeout = '2s';
