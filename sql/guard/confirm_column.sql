-- In the transaction of a connection's first write of vectors: the column's record must say that
-- the column holds what this run writes; the record is confirmed (no longer held by a run). One
-- UPDATE, whatever claimed_by says: under READ COMMITTED a record another connection confirms
-- meanwhile is read again as it now is, so the answer cannot come from an older snapshot. No row
-- back: the record says otherwise (or is gone), and the write rolls back. A provider recorded by its
-- host alone (before records kept the port) is that host at any port (guard.differing).
UPDATE etl_columns
SET claimed_by = NULL
WHERE table_name = %(table_name)s AND column_name = %(column_name)s
  AND model = %(model)s AND dimensions IS NOT DISTINCT FROM %(dimensions)s
  AND provider IN (%(provider)s, %(provider_host)s) AND recipe = %(recipe)s::text[] AND coalesce(extra_body, '') = %(extra_body)s
RETURNING 1;
