-- Schema 3: what the tool learns of a server from its answers (shape.py), kept per endpoint and
-- model, so that the next run starts right: the inputs and tokens one request may carry, the
-- tokens one input may have, whether it takes base64 and `dimensions`, whether its usage is tokens.
CREATE TABLE IF NOT EXISTS etl_limits (
    endpoint      text        NOT NULL,
    model         text        NOT NULL,
    max_inputs    int,
    max_tokens    int,
    input_tokens  int,
    floats        boolean     NOT NULL DEFAULT false,
    no_dimensions boolean     NOT NULL DEFAULT false,
    own_usage     boolean     NOT NULL DEFAULT false,
    learned       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (endpoint, model)
);

-- The fields a column's vectors were asked with (EMBEDDING_EXTRA_BODY: Voyage's input_type, Jina's
-- task...), canonical JSON, part of what the model guard compares ('' or NULL: none).
ALTER TABLE etl_columns ADD COLUMN IF NOT EXISTS extra_body text;
