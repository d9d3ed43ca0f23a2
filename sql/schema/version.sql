SELECT coalesce(max(version), 0) FROM etl_schema;
