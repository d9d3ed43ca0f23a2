-- Does one of the tool's tables exist yet (a read-only verb on a database no run has used)?
SELECT to_regclass(%(name)s) IS NOT NULL;
