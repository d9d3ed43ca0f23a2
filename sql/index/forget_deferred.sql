-- A deferred index is back: it leaves the record.
DELETE FROM etl_deferred_indexes WHERE schema_name = %(schema_name)s AND index_name = %(index_name)s;
