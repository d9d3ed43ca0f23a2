-- CONCURRENTLY: the application's queries on the table are never queued behind the drop.
DROP INDEX CONCURRENTLY IF EXISTS {index};
