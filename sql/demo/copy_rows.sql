COPY {table} (name, category, description) FROM STDIN;
