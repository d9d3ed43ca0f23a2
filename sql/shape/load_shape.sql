-- What earlier runs learned of one endpoint and model (shape.py), in shape._FIELDS' order.
SELECT max_inputs, max_tokens, input_tokens, floats, no_dimensions, own_usage
FROM etl_limits WHERE endpoint = %(endpoint)s AND model = %(model)s;
