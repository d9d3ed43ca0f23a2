"""What the tool knows about embedding models: the one place for names, sizes and prices."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    dimensions: int
    max_input_tokens: int
    usd_per_million_tokens: float


# Prices are OpenAI's list prices (standard tier) per million input tokens; override with
# ETL_PRICE_PER_MILLION_TOKENS for other providers or tiers.
KNOWN_MODELS = {
    "text-embedding-3-small": ModelInfo(1536, 8191, 0.02),
    "text-embedding-3-large": ModelInfo(3072, 8191, 0.13),
    "text-embedding-ada-002": ModelInfo(1536, 8191, 0.10),
}

# OpenAI's Batch API bills every embedding model at half its list price.
BATCH_PRICE_FACTOR = 0.5

DEFAULT_MODEL = "text-embedding-3-small"
DEFAULT_MAX_INPUT_TOKENS = 8191
LOCAL_MODEL = "local-hashing"
LOCAL_DEFAULT_DIMENSIONS = 256

# Limits of one request to the OpenAI embeddings endpoint.
MAX_INPUTS_PER_REQUEST = 2048
MAX_TOKENS_PER_REQUEST = 300_000


def model_info(model):
    """The known facts about `model`, or None for a model this tool has no table entry for."""
    return KNOWN_MODELS.get(model)


def estimate_cost(model, tokens, price_override=None, batch=False):
    """US dollars for `tokens` input tokens, or None when the price is unknown. `batch`: at the
    Batch API's price (an override is taken as the price of the path in use)."""
    if price_override is not None:
        return tokens * price_override / 1e6
    info = model_info(model)
    if info is None:
        return 0.0 if model == LOCAL_MODEL else None
    return tokens * info.usd_per_million_tokens * (BATCH_PRICE_FACTOR if batch else 1) / 1e6
