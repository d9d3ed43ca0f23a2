"""The column types a vector can be stored in: one module each (vector.py, halfvec.py), as
pgvector-python has, behind one small interface. A new type (sparsevec, bit) is a module here and
a line in TYPES; the catalog finds a column's type by its name, the write packs through it
(copy_chunks: the binary COPY of a batch's vectors).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..db import COPY_CHUNK_BYTES


@dataclass(frozen=True)
class ColumnType:
    """What the tool needs to know of one pgvector type."""

    name: str  # the SQL type name, as pg_type.typname says it
    dtype: str  # numpy dtype of one value in the binary COPY format (big-endian)
    largest: float | None = None  # the largest finite value the type holds (None: float32's)
    distance: str = "<=>"  # the cosine distance operator, for `search`

    def binary(self, vectors: np.ndarray) -> tuple[bytes, np.ndarray]:
        """A float32 matrix in the type's binary format (what COPY ... FORMAT binary and pgvector's
        send/recv functions read): the head of every row (int16 dimensions, int16 unused), and the
        values, a row each. Apart, so that a row's values are copied once, into the COPY's chunk."""
        return struct.pack(">HH", vectors.shape[1], 0), vectors.astype(self.dtype)

    def holds(self, vectors: np.ndarray) -> np.ndarray:
        """Which rows the type can store: finite values within its range."""
        ok = np.isfinite(vectors).all(axis=1)
        if self.largest is not None:
            ok &= (np.abs(vectors) <= self.largest).all(axis=1)
        return ok

    def sql(self, dimensions: int | None) -> str:
        """The column type as SQL writes it: vector(1536), halfvec, ..."""
        return f"{self.name}({dimensions})" if dimensions else self.name


def width_error(
    shown: str, column_type: str, typed: int | None, configured: int | None, model: str, width: int, refused: bool
) -> str | None:
    """The one-line message when an embedding's width is not the column's (or EMBEDDING_DIMENSIONS'),
    or None when it fits. `typed` is the column's dimension count, `configured` EMBEDDING_DIMENSIONS,
    `refused`: the server does not accept `dimensions` (it is no longer sent)."""
    expected = typed or configured
    if not expected or width == expected:
        return None
    if configured:  # asked for, and not given
        what = "does not accept" if refused else "ignored"
        return (
            f"the server {what} `dimensions` ({configured} asked, {width} returned by {model}): make {shown} "
            f"{column_type.split('(')[0]}({width}), the model's own size, without EMBEDDING_DIMENSIONS, "
            "or use a server that supports `dimensions`"
        )
    return (
        f"{shown} is {column_type} but {model} returned {width} dimensions; "
        f"set EMBEDDING_DIMENSIONS={expected} or change the column"
    )


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def copy_chunks(
    row_ids: Sequence[str], hashes: Sequence[int | None], vectors: np.ndarray, kind: ColumnType
) -> Iterator[bytes]:
    """The binary COPY of (row_id text, text_hash bigint, embedding vector or halfvec) rows, about
    COPY_CHUNK_BYTES at a time, so that a batch's vectors exist once in memory (the matrix), not two
    or three times. Each vector in its column type's binary format (columns/); a hash of None is
    sent as NULL."""
    yield _COPY_HEADER
    size = np.dtype(kind.dtype).itemsize * vectors.shape[1] + 4  # the vector field: its header, its values
    per_chunk = max(1, COPY_CHUNK_BYTES // (size + 96))
    null = struct.pack(">i", -1)
    for start in range(0, len(row_ids), per_chunk):
        parts: list[bytes | memoryview] = []
        end = start + per_chunk
        head, values = kind.binary(vectors[start:end])
        field = struct.pack(">i", size) + head
        for row_id, digest, row in zip(row_ids[start:end], hashes[start:end], values):
            encoded = row_id.encode("utf-8")
            hashed = null if digest is None else struct.pack(">iq", 8, digest)
            parts += (struct.pack(">hi", 3, len(encoded)), encoded, hashed, field, row.data)  # a view: join copies it
        yield b"".join(parts)
    yield _COPY_TRAILER


from .halfvec import HALFVEC  # noqa: E402 - the types need ColumnType above
from .vector import VECTOR  # noqa: E402

TYPES = {column_type.name: column_type for column_type in (VECTOR, HALFVEC)}
