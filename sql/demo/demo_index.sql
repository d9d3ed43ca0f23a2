-- The demo's partial index, and statistics for its planner (CREATE INDEX outside a transaction).
CREATE INDEX ON {table} (id) WHERE embedding IS NULL;
ANALYZE {table};
