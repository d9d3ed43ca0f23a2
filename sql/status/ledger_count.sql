SELECT count(*) FROM etl_failures WHERE table_name = %(table_name)s;
