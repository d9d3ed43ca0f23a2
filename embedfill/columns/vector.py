"""pgvector's `vector`: float32 values (4 bytes each), up to 16,000 dimensions."""

from . import ColumnType

VECTOR = ColumnType(name="vector", dtype=">f4")
