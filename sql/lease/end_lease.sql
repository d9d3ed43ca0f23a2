-- A run ends: its claims, its column record if no write confirmed it, and its lease go.
DELETE FROM etl_claims WHERE run_id = %(run_id)s;
DELETE FROM etl_columns WHERE claimed_by = %(run_id)s;
DELETE FROM etl_runs WHERE run_id = %(run_id)s;
