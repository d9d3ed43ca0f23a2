-- The demo's table, shaped like the seed's foods: recreated by every `etl.py demo`.
DROP TABLE IF EXISTS foods;
CREATE TABLE foods (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    category    text,
    description text,
    embedding   vector({dimensions})
);
