-- The ledger for one table: how many rows, and the most common reasons.
SELECT reason, count(*) AS rows
FROM etl_failures
WHERE table_name = %(table_name)s
GROUP BY reason
ORDER BY count(*) DESC, reason
LIMIT %(top)s;
