"""embedfill: backfill a pgvector column from an OpenAI-compatible embeddings API."""

__version__ = "0.23.0"
