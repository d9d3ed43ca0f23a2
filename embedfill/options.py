"""The options table: every setting, declared once (its environment name, flag, default, parser,
help and the verbs that read it). The argument parser, the help texts, config.env.example,
docs/configuration.md and `settings.resolve` all read this one table.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .models import DEFAULT_MODEL, MAX_INPUTS_PER_REQUEST
from .providers import provider_name

T = TypeVar("T")


def _checked(parse: Callable[[str], T], ok: Callable[[T], bool], message: str) -> Callable[[str], T]:
    """A parser for one setting: `parse` the text, then refuse a value that is not `ok`."""

    def check(text: str) -> T:
        value = parse(text)
        if not ok(value):
            raise ValueError(message)
        return value

    return check


def _column_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


positive_int = _checked(int, lambda value: value >= 1, "must be 1 or more")
_non_negative_int = _checked(int, lambda value: value >= 0, "must be 0 or more")
_positive_float = _checked(float, lambda value: value > 0, "must be more than 0")
_batch_size = _checked(
    positive_int,
    lambda value: value <= MAX_INPUTS_PER_REQUEST,
    f"must be at most {MAX_INPUTS_PER_REQUEST} (the API's limit of inputs per request)",
)
_columns = _checked(_column_list, bool, "needs at least one column name")
_log_format = _checked(str.lower, lambda value: value in ("text", "json"), "must be text or json")
_encoding_format = _checked(str.lower, lambda value: value in ("base64", "float"), "must be base64 or float")


def _listen_address(text: str) -> str:
    """HOST:PORT for serve --http (a bare PORT listens on 127.0.0.1)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9300")
    return f"{host.strip('[]') or '127.0.0.1'}:{port}"


def json_object(text: str) -> str:
    """A JSON object, kept canonical (sorted keys, compact): the model guard compares it as text."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"must be a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise ValueError('must be a JSON object, e.g. {"input_type": "document"}')
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) if value else ""


OWN_FIELDS = ("input", "model", "dimensions", "encoding_format")  # the tool's, set by their own settings
_SECRET_KEY = re.compile(r"key|token|secret|password|auth", re.I)


def extra_body(text: str) -> str:
    """EMBEDDING_EXTRA_BODY: a JSON object that does not set the request's own fields."""
    value = json_object(text)
    own = [name for name in OWN_FIELDS if name in json.loads(value or "{}")]
    if own:
        raise ValueError(
            f"may not set {', '.join(own)}: the tool sets them (EMBEDDING_MODEL, EMBEDDING_DIMENSIONS, "
            "ETL_ENCODING_FORMAT)"
        )
    return value


def extra_body_secrets(text: str | None) -> list[str]:
    """The values of EMBEDDING_EXTRA_BODY's fields named like secrets (api_key, token...): never shown or stored."""
    fields = json.loads(text or "{}")
    return [str(value) for key, value in fields.items() if _SECRET_KEY.search(key) and value]


def boolean(text: str) -> bool:
    """A boolean setting: true/false, yes/no, on/off or 1/0 in the environment or config.env (on
    the command line, a plain flag: the parser tells boolean settings apart by this function)."""
    value = _BOOLEANS.get(text.strip().lower())
    if value is None:
        raise ValueError("must be true or false")
    return value


_provider = provider_name  # the registry's names (providers/__init__.py)
_batch_rows = _checked(
    positive_int, lambda value: value <= 50_000, "must be at most 50000 (the Batch API's limit of inputs per batch)"
)
_log_level = _checked(
    str.upper, lambda value: value in ("DEBUG", "INFO", "WARNING", "ERROR"), "must be DEBUG, INFO, WARNING or ERROR"
)


# The verbs, and which of them read each setting (Option.verbs): a verb's --help shows and
# its parser accepts only the flags of its own settings.
VERBS = ("run", "init", "status", "demo", "search", "embed", "verify", "batches", "serve", "db")
_ALL = VERBS
_DATABASE = tuple(verb for verb in VERBS if verb != "db")
_TABLE = ("run", "init", "status", "search", "embed", "verify", "batches")
_EMBEDS = ("run", "demo", "search", "embed", "verify", "batches", "serve")  # they call the provider
_RECORDS = (*_EMBEDS, "init")  # what the column's record says it holds (init --track-changes records it)
_RUNS = ("run", "demo", "verify", "serve")  # worker pools: workers, batches, budgets, retries
_FOLLOWS = ("run", "serve")  # keep columns filled: --follow and serve


@dataclass(frozen=True)
class Option:
    """One setting: where it can come from, its default, how to parse it, what it means, who reads it.
    `dest` is also the name of its field in `settings.Settings`."""

    dest: str
    env: str  # its name in the environment and config.env
    flag: str | None
    default: object
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    verbs: tuple[str, ...] = _ALL


# fmt: off
OPTIONS = [
    Option("database_url", "DATABASE_URL", "--database-url", None, str,
           "PostgreSQL connection URL; when unset, an embedded PostgreSQL in ETL_PGDATA is used", "URL",
           verbs=_DATABASE),
    Option("pgdata", "ETL_PGDATA", "--pgdata", ".pgdata", str,
           "data folder of the embedded PostgreSQL (used only without DATABASE_URL)", "DIR"),
    Option("api_key", "OPENAI_API_KEY", None, None, str, "API key of the embeddings provider", verbs=_EMBEDS),
    Option("base_url", "OPENAI_BASE_URL", "--base-url", None, str,
           "any OpenAI-compatible endpoint (vLLM, Ollama, TEI, LM Studio); default: the SDK's", "URL", verbs=_RECORDS),
    Option("provider", "ETL_PROVIDER", "--provider", "openai", _provider,
           "openai (any OpenAI-compatible API), azure (Azure OpenAI), ollama (Ollama's own /api/embed) "
           "or local (offline lexical hashing, no key)",
           "NAME", verbs=_RECORDS),
    Option("model", "EMBEDDING_MODEL", "--model", DEFAULT_MODEL, str,
           "embedding model name (with Azure: the model the deployment serves, for tokens and price)", "NAME",
           verbs=_RECORDS),
    Option("azure_endpoint", "AZURE_OPENAI_ENDPOINT", "--azure-endpoint", None, str,
           "Azure OpenAI resource endpoint, https://NAME.openai.azure.com", "URL", verbs=_RECORDS),
    Option("azure_api_key", "AZURE_OPENAI_API_KEY", None, None, str, "Azure OpenAI key of the resource", verbs=_EMBEDS),
    Option("api_version", "OPENAI_API_VERSION", "--api-version", None, str,
           "Azure OpenAI API version, e.g. 2024-10-21", "VERSION", verbs=_RECORDS),
    Option("deployment", "AZURE_OPENAI_DEPLOYMENT", "--deployment", None, str,
           "Azure OpenAI deployment to call (default: EMBEDDING_MODEL)", "NAME", verbs=_RECORDS),
    Option("dimensions", "EMBEDDING_DIMENSIONS", "--dimensions", None, positive_int,
           "when set, sent to the API as `dimensions` (and used by `init` for a new column)", "N",
           verbs=(*_EMBEDS, "init")),
    Option("extra_body", "EMBEDDING_EXTRA_BODY", "--extra-body", None, extra_body,
           "JSON fields added to every request (Voyage's input_type...)", "JSON", verbs=_RECORDS),
    Option("encoding_format", "ETL_ENCODING_FORMAT", "--encoding-format", "base64", _encoding_format,
           "vectors asked as base64 or float (learned if base64 is refused)", "FORMAT", verbs=_EMBEDS),
    Option("table", "ETL_TABLE", "--table", None, str, "table to fill (schema.table allowed)", "NAME", verbs=_TABLE),
    Option("id_column", "ETL_ID_COLUMN", "--id-column", "id", str,
           "unique, btree-orderable id column (integer, bigint, uuid, text)", "NAME", verbs=_TABLE),
    Option("text_columns", "ETL_TEXT_COLUMNS", "--text-columns", None, _columns,
           "comma-separated columns whose non-blank values, joined by newlines, are embedded", "A,B", verbs=_TABLE),
    Option("embedding_column", "ETL_EMBEDDING_COLUMN", "--embedding-column", "embedding", str,
           "pgvector column to fill", "NAME", verbs=_TABLE),
    Option("workers", "ETL_WORKERS", "--workers", 4, positive_int, "worker processes", "N", verbs=_RUNS),
    Option("batch_size", "ETL_BATCH_SIZE", "--batch-size", 20, _batch_size,
           "rows per API request and per commit (at most 2048)", "N", verbs=_RUNS),
    Option("rpm", "ETL_RPM", "--max-requests-per-minute", None, _positive_float,
           "request budget of all workers, split between the runs using the same API key (unset: no limit)", "N",
           verbs=_RUNS),
    Option("tpm", "ETL_TPM", "--max-tokens-per-minute", None, _positive_float,
           "token budget of all workers, split between the runs using the same API key (unset: no limit)", "N",
           verbs=_RUNS),
    Option("max_attempts", "ETL_MAX_ATTEMPTS", "--max-attempts", 6, positive_int,
           "attempts per batch on transient errors other than 429 before its rows are recorded as failed", "N",
           verbs=_RUNS),
    Option("stall_seconds", "ETL_STALL_SECONDS", "--stall-seconds", 600.0, _positive_float,
           "stop when 429s have let no request succeed for this long (a 429 never fails a row)", "S", verbs=_RUNS),
    Option("request_timeout", "ETL_REQUEST_TIMEOUT", "--request-timeout", 60.0, _positive_float,
           "seconds before one API request is abandoned and retried", "S", verbs=_EMBEDS),
    Option("reconnect_seconds", "ETL_RECONNECT_SECONDS", "--reconnect-seconds", 30.0, _positive_float,
           "how long a worker tries to reopen a lost database connection before the run stops", "S",
           verbs=("run", "demo", "serve")),
    Option("max_input_tokens", "ETL_MAX_INPUT_TOKENS", "--max-input-tokens", None, positive_int,
           "longest input in tokens; longer texts are truncated (default: the model's limit, 8191)", "N", verbs=_RUNS),
    Option("price", "ETL_PRICE_PER_MILLION_TOKENS", "--price-per-million-tokens", None, float,
           "USD per million tokens for the cost estimate (default: known OpenAI prices)", "USD", verbs=_RUNS),
    Option("defer_index", "ETL_DEFER_INDEX", "--defer-index", False, boolean,
           "drop the column's HNSW/IVFFlat indexes for the run (recorded first) and rebuild them at its end",
           verbs=("run",)),
    Option("maintenance_work_mem", "ETL_INDEX_MEMORY", "--index-memory", None, str,
           "maintenance_work_mem for rebuilding a deferred index, e.g. 4GB (default: the server's)", "SIZE",
           verbs=("run", "init")),
    Option("max_parallel_maintenance_workers", "ETL_INDEX_WORKERS", "--index-workers", None, _non_negative_int,
           "parallel workers for rebuilding a deferred index (default: the server's)", "N", verbs=("run", "init")),
    Option("follow", "ETL_FOLLOW", "--follow", False, boolean,
           "after the backlog, stay up and embed new and edited rows as they come (LISTEN and polling)",
           verbs=("run",)),
    Option("poll_seconds", "ETL_POLL_SECONDS", "--poll-seconds", 30.0, _positive_float,
           "with --follow: look for NULL rows at least this often, notified or not; "
           "with --batch-api: seconds between two looks at the pending batches; serve: for new tracked columns too",
           "S", verbs=_FOLLOWS),
    Option("http", "ETL_HTTP", "--http", None, _listen_address,
           "serve: answer GET /healthz and GET /metrics (Prometheus) on HOST:PORT (default: off)", "HOST:PORT",
           verbs=("serve",)),
    Option("updated_column", "ETL_UPDATED_COLUMN", "--updated-column", None, str,
           "a timestamp column of the table: `status` shows how old the oldest NULL row is", "NAME", verbs=("status",)),
    Option("batch_api", "ETL_BATCH_API", None, False, boolean,
           "embed through OpenAI's Batch API: half the price, results within 24 h (flag: --batch-api)", verbs=("run",)),
    Option("batch_rows", "ETL_BATCH_ROWS", "--batch-rows", 50_000, _batch_rows,
           "rows per submitted batch (--batch-api; at most 50000)", "N", verbs=("run",)),
    Option("log_file", "ETL_LOG_FILE", "--log-file", None, str, "write logs here instead of stderr", "PATH"),
    Option("log_format", "ETL_LOG_FORMAT", "--log-format", "text", _log_format,
           "text, or json: one JSON object a line", "FORMAT"),
    Option("log_level", "ETL_LOG_LEVEL", "--log-level", "INFO", _log_level,
           "DEBUG shows tracebacks; INFO, WARNING, ERROR", "LEVEL"),
]
# fmt: on

OPTIONS_BY_DEST = {option.dest: option for option in OPTIONS}
