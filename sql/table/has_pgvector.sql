-- Is pgvector installed in this database (its type `vector` known)?
SELECT to_regtype('vector') IS NOT NULL;
