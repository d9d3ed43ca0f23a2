-- One batch's record changes (its state, its ids, its counts): the fields set are the {assignments}.
UPDATE etl_batches SET {assignments}, updated = now() WHERE key = %(key)s;
