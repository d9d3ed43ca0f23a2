INSERT INTO etl_schema (version) VALUES (%(version)s);
