"""Embedding providers as plug-ins: one module each, behind `base.Provider`, chosen by ETL_PROVIDER.

Adding a provider is a module here (a Provider subclass), its line in PROVIDERS, its route in
tests/fake_openai.py and its test (docs/providers.md). The worker never knows which one it has.
"""

from typing import Any

from .azure import AzureProvider
from .base import Answer, Embedding, Limits, ModelInfo, Provider, Quota, QuotaLeft
from .local import LocalProvider
from .ollama import OllamaProvider
from .openai import BATCH_PRICE_FACTOR, OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,  # any OpenAI-compatible /embeddings endpoint
    "azure": AzureProvider,
    "local": LocalProvider,
    "ollama": OllamaProvider,
}

__all__ = [
    "PROVIDERS", "Answer", "Embedding", "Limits", "ModelInfo", "Provider", "Quota", "QuotaLeft", "check_provider",
    "estimate_cost", "load_client_library", "make_embedder", "make_provider", "model_info", "provider_name",
]  # fmt: skip


def provider_name(text: str) -> str:
    """ETL_PROVIDER's parser: a registered provider's name, else ValueError."""
    if text not in PROVIDERS:
        names = list(PROVIDERS)
        raise ValueError(f"must be {', '.join(names[:-1])} or {names[-1]}")
    return text


def make_provider(settings: Any, column_dimensions: int | None = None) -> Provider:
    """The provider the settings ask for, not yet open: what it is, its limits, its identities."""
    return PROVIDERS[settings.provider](settings, column_dimensions)


def make_embedder(settings: Any, column_dimensions: int | None = None) -> Provider:
    """The provider, checked and with its client built (in the parent before the fork, or in the
    process that uses it). The local provider makes vectors of any size: EMBEDDING_DIMENSIONS, else
    the column's."""
    provider = make_provider(settings, column_dimensions)
    provider.check()
    return provider.open()


def check_provider(settings: Any) -> None:
    """Raise ConfigError for a setting the provider cannot do without (before any request)."""
    make_provider(settings).check()


def load_client_library() -> None:
    """Import the SDK: the parent does it before forking the workers, which share its pages
    instead of each spending half a second of CPU on it."""
    import httpx2  # noqa: F401 - the SDK's HTTP library
    import openai  # noqa: F401


def model_info(model: str) -> ModelInfo | None:
    """The known facts about `model` (from the providers' tables), or None."""
    for provider in PROVIDERS.values():
        if model in provider.models:
            return provider.models[model]
    return None


def estimate_cost(model: str, tokens: int, price_override: float | None = None, batch: bool = False) -> float | None:
    """US dollars for `tokens` input tokens, or None when the price is unknown. `batch`: at the
    Batch API's price (an override is taken as the price of the path in use)."""
    if price_override is not None:
        return tokens * price_override / 1e6
    info = model_info(model)
    if info is None:
        return None
    return tokens * info.usd_per_million_tokens * (BATCH_PRICE_FACTOR if batch else 1) / 1e6
