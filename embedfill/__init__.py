"""embedfill: backfill a pgvector column from an OpenAI-compatible embeddings API."""
