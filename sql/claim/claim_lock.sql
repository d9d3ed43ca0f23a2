-- Before a claim (sql/claim/claim_batch.sql): the claims of one table's column are made one at a time.
-- Held until the claim commits (a few milliseconds), so that the next claim sees this one.
SELECT pg_advisory_xact_lock(%(claim_key)s, hashtext(%(table_name)s || '.' || %(column_name)s));
