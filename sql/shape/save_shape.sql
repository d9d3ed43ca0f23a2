-- What this run learned of one endpoint and model, kept for the next (a limit only ever lowers);
-- at the end of a pass, perhaps on the way out after a signal: never waits long.
SET LOCAL statement_timeout = '5s';
SET LOCAL lock_timeout = '1s';
INSERT INTO etl_limits AS l (endpoint, model, max_inputs, max_tokens, input_tokens, floats, no_dimensions, own_usage)
VALUES (%(endpoint)s, %(model)s, %(max_inputs)s, %(max_tokens)s, %(input_tokens)s, %(floats)s, %(no_dimensions)s,
        %(own_usage)s)
ON CONFLICT (endpoint, model) DO UPDATE
SET max_inputs = least(l.max_inputs, EXCLUDED.max_inputs),
    max_tokens = least(l.max_tokens, EXCLUDED.max_tokens),
    input_tokens = least(l.input_tokens, EXCLUDED.input_tokens),
    floats = l.floats OR EXCLUDED.floats,
    no_dimensions = l.no_dimensions OR EXCLUDED.no_dimensions,
    own_usage = l.own_usage OR EXCLUDED.own_usage,
    learned = now();
