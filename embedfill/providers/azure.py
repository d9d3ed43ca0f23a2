"""Azure OpenAI, through the SDK's own AzureOpenAI client: the deployment goes into the path
(/openai/deployments/<deployment>/embeddings?api-version=…) and the key into the `api-key` header.
Everything else (body, answer, headers, errors) is OpenAI's."""

from typing import Any

from ..errors import ConfigError, FatalProviderError, ProviderError
from .base import check_url
from .openai import OpenAIProvider


class AzureProvider(OpenAIProvider):
    name = "azure"
    url_setting = "AZURE_OPENAI_ENDPOINT"
    key_setting = "AZURE_OPENAI_API_KEY"
    batch_endpoint = None  # Azure's Batch API needs a deployment of its own: not supported

    def __init__(self, settings: Any, column_dimensions: int | None = None):
        super().__init__(settings, column_dimensions)
        # EMBEDDING_MODEL is what the deployment serves (its limits, price and record);
        # requests name the deployment, which the SDK puts into the path.
        self.model = settings.deployment or settings.model
        self.endpoint, self._secret = settings.azure_endpoint, settings.azure_api_key

    def check(self) -> None:
        settings = self.settings
        needed = {
            "AZURE_OPENAI_ENDPOINT": settings.azure_endpoint,
            "AZURE_OPENAI_API_KEY": settings.azure_api_key,
            "OPENAI_API_VERSION": settings.api_version,
        }
        missing = [name for name, value in needed.items() if not value]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set: Azure OpenAI needs its endpoint, key and API version")
        check_url("AZURE_OPENAI_ENDPOINT", self.endpoint)

    def make_client(self, openai: Any, options: dict) -> Any:
        return openai.AzureOpenAI(
            azure_endpoint=self.endpoint,
            api_key=self.settings.azure_api_key,
            api_version=self.settings.api_version,
            **options,
        )

    def status_error(self, status: int, message: str, headers: Any = None, code: str | None = None) -> ProviderError:
        if status == 404:
            return FatalProviderError(
                f"Azure OpenAI at {self.endpoint} has no deployment {self.model} for api-version "
                f"{self.settings.api_version} (404: {message}); check AZURE_OPENAI_DEPLOYMENT, OPENAI_API_VERSION "
                "and AZURE_OPENAI_ENDPOINT (the resource's URL, without /openai)"
            )
        return super().status_error(status, message, headers, code)
