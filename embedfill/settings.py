"""Settings: resolved once from command-line flags > environment > config.env, then frozen and
passed down; config.env is read here, and names that look like settings and are not are warned of.

Each setting is declared in options.OPTIONS; `Settings` holds one field per option (of the same
name, type and default: tests/test_settings.py holds them together) and the few values that only
the command line sets.
"""

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from dotenv import dotenv_values

from .errors import ConfigError, UsageError
from .models import DEFAULT_MODEL, LOCAL_MODEL, model_context, model_info
from .options import OPTIONS, OPTIONS_BY_DEST


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a verb needs, resolved once: a field per option, then what only the command line sets."""

    # The database.
    database_url: str | None = None  # None: the embedded PostgreSQL in `pgdata`
    pgdata: str = ".pgdata"

    # The embeddings provider.
    api_key: str | None = None
    base_url: str | None = None
    provider: str = "openai"
    model: str = DEFAULT_MODEL
    azure_endpoint: str | None = None
    azure_api_key: str | None = None
    api_version: str | None = None
    deployment: str | None = None
    dimensions: int | None = None
    extra_body: str | None = None  # canonical JSON of an object (options.json_object)
    encoding_format: str = "base64"

    # The table.
    table: str | None = None
    id_column: str = "id"
    text_columns: tuple[str, ...] | None = None
    embedding_column: str = "embedding"

    # The run: its workers, their budgets and retries.
    workers: int = 4
    batch_size: int = 20
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = 6
    stall_seconds: float = 600.0
    request_timeout: float = 60.0
    reconnect_seconds: float = 30.0
    max_input_tokens: int | None = None
    price: float | None = None

    # Vector indexes.
    defer_index: bool = False
    maintenance_work_mem: str | None = None
    max_parallel_maintenance_workers: int | None = None

    # Keeping in sync.
    follow: bool = False
    poll_seconds: float = 30.0
    http: str | None = None  # serve: where /healthz and /metrics answer
    updated_column: str | None = None

    # The Batch API.
    batch_api: bool = False
    batch_rows: int = 50_000

    # Output.
    log_file: str | None = None
    log_format: str = "text"
    log_level: str = "INFO"

    # Only from the command line (no option, no environment name): --limit, --no-truncate,
    # --retry-failed, --dry-run, --no-wait (with --batch-api) and --progress-interval.
    limit: int | None = None
    truncate: bool = True
    retry_failed: bool = False
    dry_run: bool = False
    no_wait: bool = False
    progress_interval: float = 10.0  # seconds between progress lines when stderr is not a terminal

    @property
    def input_token_limit(self) -> int:
        """The longest input in tokens that is sent unchanged."""
        return self.max_input_tokens or model_context(self.model, model_info(self.model))

    @property
    def model_name(self) -> str:
        """The model as reported to the user (the local provider has its own name)."""
        return LOCAL_MODEL if self.provider == "local" else self.model


# The fields of Settings that no option declares: the command line sets them (through `flags`).
COMMAND_LINE_ONLY = tuple(field.name for field in fields(Settings) if field.name not in OPTIONS_BY_DEST)


def read_config_file(path: str, explicit: bool) -> dict[str, str]:
    """The name=value pairs of a config.env file; {} when the default file is absent."""
    if not os.path.exists(path):
        if explicit:
            raise UsageError(f"config file {path} does not exist (given with --config)")
        return {}
    if os.path.isdir(path):
        raise UsageError(f"config file {path} is a directory")
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


# Names the openai SDK itself reads from the environment (never from config.env), that users set.
SDK_ENVIRONMENT = ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG", "AZURE_OPENAI_AD_TOKEN")
CHECKED_PREFIXES = ("ETL_", "EMBEDDING_", "OPENAI_", "AZURE_")
# Names a user may try for what is a command-line flag only, and that flag.
FLAG_ONLY = {
    "ETL_LIMIT": "--limit",
    "ETL_TRUNCATE": "--no-truncate",
    "ETL_RETRY_FAILED": "--retry-failed",
    "ETL_DRY_RUN": "--dry-run",
    "ETL_NO_WAIT": "--no-wait",
}


def unknown_settings(file_values: Mapping[str, str], environ: Mapping[str, str], path: str = "config.env") -> list[str]:
    """One warning per name that looks like a setting and is not one: a key of the config file with
    an ETL_/EMBEDDING_/OPENAI_/AZURE_ prefix or close to a setting's name (EMBEDING_MODEL), an ETL_
    variable of the environment; each with the closest setting."""
    known = [option.env for option in OPTIONS]
    found = [
        (key, path)
        for key in file_values
        if key.startswith(CHECKED_PREFIXES) or difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    ]
    found += [(key, "the environment") for key in environ if key.startswith("ETL_")]
    warnings = []
    for key, where in found:
        if key in known:
            continue
        if key in SDK_ENVIRONMENT:
            if where == path:
                warnings.append(f"{key} in {where} is read by the openai SDK from the environment only: export it")
            continue
        if key in FLAG_ONLY:
            warnings.append(f"{key} in {where} is not a setting ({FLAG_ONLY[key]} is a command-line flag only)")
            continue
        guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]}?" if guess else "docs/configuration.md lists the settings"
        warnings.append(f"{key} in {where} is not a setting ({hint})")
    return warnings


def resolve(
    flags: Mapping[str, Any], environ: Mapping[str, str], file_values: Mapping[str, str], required: Iterable[str] = ()
) -> Settings:
    """Build Settings: a flag wins over the environment, which wins over config.env.

    `flags` maps option dest (or a command-line-only field) to an already-parsed value (None when
    not given); values from the environment and the file are parsed here. `required` names dests
    that must be set.
    """
    values: dict[str, Any] = {}
    for option in OPTIONS:
        value = flags.get(option.dest)
        if value is None:
            raw = environ.get(option.env)
            source = "environment"
            if raw is None or raw == "":
                raw = file_values.get(option.env)
                source = "config.env"
            if raw is not None and raw != "":
                try:
                    value = option.parse(raw)
                except ValueError as error:
                    raise ConfigError(f"{option.env}={raw!r} in the {source} is invalid: {error}") from None
        values[option.dest] = option.default if value is None else value
    for dest in required:
        if values.get(dest) in (None, ()):
            option = OPTIONS_BY_DEST[dest]
            where = f"{option.env} in config.env or the environment"
            if option.flag:
                where += f", or pass {option.flag}"
            raise ConfigError(f"{option.env} is not set: set {where}")
    for key in COMMAND_LINE_ONLY:
        if flags.get(key) is not None:
            values[key] = flags[key]
    return Settings(**values)
