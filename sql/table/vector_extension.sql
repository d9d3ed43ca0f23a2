-- Is pgvector installed in this database (its version), and can it be (`init` checks before it creates anything)?
SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector');
