-- The table's oid, resolved with the session's search_path (before index/vector_indexes.sql empties it).
SELECT to_regclass(%(relation)s)::oid;
