-- What the ledger says a column holds (catalog.column_record). live: the record is confirmed (a
-- write of vectors cleared claimed_by), or the run that made it still renews its lease.
SELECT model, dimensions, provider, recipe, coalesce(extra_body, '') AS extra_body, origin_unknown, claimed_by,
       to_char(recorded, 'YYYY-MM-DD HH24:MI TZ') AS recorded,
       claimed_by IS NULL OR EXISTS (SELECT 1 FROM etl_runs r
                                     WHERE r.run_id = claimed_by AND r.lease_until > now()) AS live
FROM etl_columns
WHERE table_name = %(table_name)s AND column_name = %(column_name)s;
