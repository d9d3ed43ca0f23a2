-- Is the current role (a member of) the table's owner? Only the owner may index it or add a trigger.
SELECT pg_has_role(c.relowner, 'USAGE')
FROM pg_class c
WHERE c.oid = to_regclass(%(relation)s);
