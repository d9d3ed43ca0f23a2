-- Renew this run's lease, then count the live runs that use the same API key (its hash).
-- Rows of runs that died are left to expire (their claims and unconfirmed column records die
-- with them); those over an hour old are cleared here, with what they left behind.
INSERT INTO etl_runs (run_id, key_hash, table_name, tpm, rpm, lease_until)
VALUES (%(run_id)s, %(key_hash)s, %(table_name)s, %(tpm)s, %(rpm)s,
        now() + make_interval(secs => %(lease_seconds)s))
ON CONFLICT (run_id) DO UPDATE SET lease_until = EXCLUDED.lease_until;
DELETE FROM etl_runs WHERE lease_until < now() - interval '1 hour';
DELETE FROM etl_claims c WHERE NOT EXISTS (SELECT 1 FROM etl_runs r WHERE r.run_id = c.run_id);
SELECT count(*) FROM etl_runs WHERE key_hash = %(key_hash)s AND lease_until > now();
