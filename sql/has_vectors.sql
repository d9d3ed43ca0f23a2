-- Does the column hold any vector yet? Asked once per column, when the tool first sees it and
-- only when the planner's statistics have not already said so; stops at the first vector, but
-- would read a table still all NULL to its end: the caller bounds it with statement_timeout.
SELECT EXISTS (SELECT 1 FROM {table} WHERE {embedding} IS NOT NULL);
