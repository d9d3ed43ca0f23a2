-- `init --reset-column --yes`: set the column to NULL for the next %(limit)s ids after
-- %(after)s (keyset over the id, never OFFSET), one committed chunk at a time, so that a
-- 10M-row table is never one giant transaction. Returns the chunk's last id (NULL: done)
-- and how many vectors it cleared.
WITH chunk AS (
    SELECT {id} FROM {table}
    WHERE %(after)s::{id_type} IS NULL OR {id} > %(after)s::{id_type}
    ORDER BY {id}
    LIMIT %(limit)s
), cleared AS (
    UPDATE {table} t SET {embedding} = NULL
    FROM chunk c
    WHERE t.{id} = c.{id} AND t.{embedding} IS NOT NULL
    RETURNING 1
)
SELECT (SELECT {id}::text FROM chunk ORDER BY {id} DESC LIMIT 1), (SELECT count(*) FROM cleared);
