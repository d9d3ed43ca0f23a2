"""The project's exception types and the exit codes they map to (documented in README.md)."""

import signal
from types import FrameType

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class EtlError(Exception):
    """A failure the user can act on: its message is one line, printed without a traceback."""

    exit_code = EXIT_FATAL


class UsageError(EtlError):
    """Bad command-line or configuration input (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(EtlError):
    """A setting is missing or wrong (exit 1)."""


class DatabaseError(EtlError):
    """The database is unreachable or the table is not what the configuration says."""


class DatabaseGone(DatabaseError):
    """The database connection was lost and did not come back within --reconnect-seconds."""


class ProviderError(EtlError):
    """An error from the embeddings provider, wrapped once from the SDK's exception."""


class TransientProviderError(ProviderError):
    """The server's problem, never a row's: 408/409/429/5xx, a timeout, a dropped or refused
    connection. `kind` says which: "rate_limited" (429), "timeout", "unreachable" (no connection
    could be made: refused, a name that does not resolve) or "error"."""

    def __init__(self, message: str, retry_after: float | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind

    @property
    def rate_limited(self) -> bool:
        return self.kind == "rate_limited"

    def __reduce__(self) -> tuple[type, tuple[str, float | None, str]]:
        return (type(self), (str(self), self.retry_after, self.kind))


class InvalidInputError(ProviderError):
    """The provider refused the inputs of a request (400/413/422): what it says may teach a limit
    of the server (shape.lesson); else the batch is split to find the culprit."""

    def __init__(self, message: str, status: int | None = None, said: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.said = said or message


class FatalProviderError(ProviderError):
    """Bad key, no access, unknown model, a dimension mismatch: stop every worker."""


class Stop(BaseException):
    """The one way to say "stop now": SIGINT or SIGTERM (`signum`; exit 130 or 143), or a stop of
    the run that reached a process while it waited (`signum` None). A BaseException, like
    KeyboardInterrupt, so that no `except Exception` (ours, the SDK's, the HTTP library's) turns
    it into an error to retry."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.signum == signal.SIGTERM else EXIT_SIGINT

    @classmethod
    def on_signal(cls, signum: int, frame: FrameType | None) -> None:
        """A signal handler that raises Stop(signum)."""
        raise cls(signum)


class WorkerDied(EtlError):
    """A worker process ended without reporting (OOM killer, segfault)."""
