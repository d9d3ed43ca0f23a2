-- The index every claim and every progress count walks: only the rows still to embed.
-- It shrinks as the run goes on. {concurrently} is CONCURRENTLY (safe on a live table; it cannot
-- run in a transaction) except on a partitioned table, which cannot build it so in one statement.
CREATE INDEX {concurrently} IF NOT EXISTS {index} ON {table} ({id}) WHERE {embedding} IS NULL;
