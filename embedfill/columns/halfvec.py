"""pgvector's `halfvec`: float16 values (2 bytes each, up to 65504), up to 16,000 dimensions: half the
space of `vector` for embeddings whose precision does not need more."""

from . import ColumnType

HALFVEC = ColumnType(name="halfvec", dtype=">f2", largest=65504.0)
