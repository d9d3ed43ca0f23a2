-- A batch about to be submitted, and its rows (the VALUES list), in one transaction: from its
-- commit on no run claims these rows, and a rerun after a kill finds the batch by its key.
INSERT INTO etl_batches (key, table_name, row_count) VALUES (%(key)s, %(table_name)s, %(row_count)s);
