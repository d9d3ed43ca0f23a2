-- Does the column hold any vector yet? Asked once per column, when the tool first sees it and
-- only when the planner's statistics have not already said so; stops at the first vector, but
-- would read a table still all NULL to its end: bounded to 5 s (the caller then takes it as empty).
SET LOCAL statement_timeout = '5s';
SELECT EXISTS (SELECT 1 FROM {table} WHERE {embedding} IS NOT NULL);
