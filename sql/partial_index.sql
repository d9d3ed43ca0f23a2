-- The index every claim and every progress count walks: only the rows still to embed.
-- It shrinks as the run goes on. CONCURRENTLY: safe on a live table (cannot run in a transaction).
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({id}) WHERE {embedding} IS NULL;
