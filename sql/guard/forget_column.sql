-- `init --reset-column --yes`, once the column is all NULL: forget what it held and the
-- table's failed rows (the ledger keys failures by table, not by column).
DELETE FROM etl_columns WHERE table_name = %(table_name)s AND column_name = %(column_name)s;
DELETE FROM etl_failures WHERE table_name = %(table_name)s;
