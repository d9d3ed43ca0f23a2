"""`etl.py search` and `etl.py embed`: a text's vector by the column's model (refused when the column
holds another model's vectors), and the rows nearest to it."""

import json
import logging
import multiprocessing
from typing import TYPE_CHECKING, TextIO

import numpy as np
from pgvector.psycopg2 import register_vector

from . import catalog, db, guard
from .errors import EXIT_OK, ConfigError
from .lessons import embed_once
from .providers import make_embedder
from .shape import Shape
from .texts import row_text

if TYPE_CHECKING:
    from .catalog import Target
    from .settings import Settings

log = logging.getLogger(__name__)


def query_vector(
    conn: db.Connection, settings: "Settings", target: "Target", text: str, verb: str = "search"
) -> tuple[np.ndarray, str]:
    """The vector of `text` by the configured provider, and the model that made it; refused when
    the column holds vectors of another model or dimension count (they would not compare)."""
    held, wanted = guard.column_record(conn, target), guard.column_identity(settings, target)
    differing = [] if held is None else guard.differing(held, wanted, ("model", "dimensions"))
    if held is not None and differing:  # vectors of two models are not comparable: the nearest rows would be noise
        raise ConfigError(
            f"{target.display}.{target.embedding_column} holds {guard.describe_identity(held, differing)}; "
            f"a {guard.describe_identity(wanted, differing, 'query')} cannot be compared with them: "
            f"{verb} with the model and dimensions that filled the column"
        )
    embedder = make_embedder(settings, target.dimensions)
    shape = Shape(multiprocessing.get_context())
    shape.load(conn, embedder.endpoint, embedder.model)
    try:
        vector = embed_once(embedder, shape, text)  # floats, no `dimensions`: as the runs learned to ask this server
        shape.keep(settings.database_url, embedder.endpoint, embedder.model)
    finally:
        embedder.close()
    error = target.width_error(settings, vector.shape[0], bool(shape["no_dimensions"]))
    if error:
        raise ConfigError(f"{error} (the query cannot be compared with the column's vectors)")
    return vector, wanted["model"]


def search(settings: "Settings", query: str, top: int, out: TextIO, as_json: bool = False) -> int:
    """Embed `query` with the configured provider and print the nearest rows (as text, or one JSON document)."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        vector, model = query_vector(conn, settings, target, query)
        register_vector(conn)
        with conn.cursor() as cur:
            cur.execute(target.query("search/nearest"), {"query": vector, "top": top})
            rows = cur.fetchall()
        conn.rollback()
    finally:
        conn.close()
    if as_json:
        document = {
            "table": target.display,
            "column": target.embedding_column,
            "model": model,
            "dimensions": int(vector.shape[0]),
            "query": query,
            "rows": [
                {"id": row_id, "distance": distance, "text": row_text(values)} for row_id, *values, distance in rows
            ],
        }
        print(json.dumps(document, ensure_ascii=False), file=out)
        return EXIT_OK
    if not rows:
        print(f"no embedded rows in {target.display} yet: run `python etl.py` first", file=out)
    for row_id, *values, distance in rows:
        text = row_text(values).replace("\n", " | ")
        print(f"{distance:.4f}  {row_id}  {text[:120]}", file=out)
    return EXIT_OK


def embed(settings: "Settings", text: str, out: TextIO) -> int:
    """`embed TEXT`: {"model", "dimensions", "embedding"} of the vector the column's model makes for it."""
    conn = db.connect(settings.database_url)
    try:
        target = catalog.inspect_target(conn, settings)
        vector, model = query_vector(conn, settings, target, text, verb="embed")
    finally:
        conn.close()
    # Each float32 by its shortest repr: it reads back as the same float32.
    values = ",".join(str(value) for value in vector.astype(np.float32))
    print(f'{{"model": {json.dumps(model)}, "dimensions": {vector.shape[0]}, "embedding": [{values}]}}', file=out)
    return EXIT_OK
