"""What the tool knows about embedding models. The facts live with their providers (providers/);
these names stay importable here for config.py and cli.py."""

from .providers import estimate_cost, model_info
from .providers.base import DEFAULT_MAX_INPUT_TOKENS, ModelInfo, model_context
from .providers.local import LOCAL_DEFAULT_DIMENSIONS, LOCAL_MODEL
from .providers.openai import (
    BATCH_PRICE_FACTOR,
    DEFAULT_MODEL,
    KNOWN_MODELS,
    MAX_INPUTS_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
)

__all__ = [
    "BATCH_PRICE_FACTOR", "DEFAULT_MAX_INPUT_TOKENS", "DEFAULT_MODEL", "KNOWN_MODELS", "LOCAL_DEFAULT_DIMENSIONS",
    "LOCAL_MODEL", "MAX_INPUTS_PER_REQUEST", "MAX_TOKENS_PER_REQUEST", "ModelInfo", "estimate_cost", "model_context",
    "model_info",
]  # fmt: skip
