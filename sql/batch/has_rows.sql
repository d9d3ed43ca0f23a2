-- Rows of the table in a pending --batch-api batch? (Then a run's claims skip them: claim/skip_batched.sql.)
SELECT EXISTS (SELECT 1 FROM etl_batch_rows WHERE table_name = %(table_name)s);
