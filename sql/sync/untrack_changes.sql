-- `init --untrack`: remove what `init --track-changes` installed (only that; idempotent).
DROP TRIGGER IF EXISTS {trigger} ON {table};
DROP FUNCTION IF EXISTS {function}();
