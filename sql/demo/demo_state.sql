-- Is there a table of the demo's name, and does it carry the demo's comment?
SELECT to_regclass(%(name)s) IS NOT NULL, obj_description(to_regclass(%(name)s), 'pg_class');
