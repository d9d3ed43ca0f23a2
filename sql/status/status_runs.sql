-- Live runs of this table and `serve` processes ('*': every tracked column), their lease not run out,
-- each with the number of live runs that share its API key's quota (its configured budgets are divided by that number).
SELECT r.run_id, r.tpm, r.rpm, s.runs, date_trunc('second', now() - r.started)::text
FROM etl_runs r
JOIN (SELECT key_hash, count(*) AS runs FROM etl_runs WHERE lease_until > now() GROUP BY key_hash) s USING (key_hash)
WHERE r.table_name IN (%(table_name)s, '*') AND r.lease_until > now()
ORDER BY r.started;
