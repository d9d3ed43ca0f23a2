-- `init --track-changes`: keep the embedding column true while the table changes, with the
-- design's one rule, "NULL means needs a vector". A BEFORE trigger sets the vector to NULL
-- when a text column changes value, and wakes `--follow` runs through NOTIFY (the payload is
-- empty: they only need a wake-up; PostgreSQL folds the repeats of one transaction into one).
--
-- UPDATE OF the text columns: updates of other columns never even call the function. An
-- update that also changes the vector means its writer set the vector itself: left alone.
-- The tool's own write (sql/write/write_batch.sql) sets only the vector, so it does not fire this.
-- Idempotent: the function is replaced and the trigger recreated, one per (table, column).
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $embedfill$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.{embedding} IS DISTINCT FROM OLD.{embedding}
           OR ROW({new_texts}) IS NOT DISTINCT FROM ROW({old_texts}) THEN
            RETURN NEW;
        END IF;
        NEW.{embedding} := NULL;
    ELSIF NEW.{embedding} IS NOT NULL THEN
        RETURN NEW;  -- inserted with its vector: nothing to do
    END IF;
    PERFORM pg_notify({channel}, '');
    RETURN NEW;
END
$embedfill$;
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OF {columns} ON {table}
FOR EACH ROW EXECUTE FUNCTION {function}();
