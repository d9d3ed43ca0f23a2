-- Does the column hold any vector yet? Asked once per column, when the tool first sees it:
-- stops at the first vector, but reads a table that is still all NULL to its end.
SELECT EXISTS (SELECT 1 FROM {table} WHERE {embedding} IS NOT NULL);
