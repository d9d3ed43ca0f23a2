"""The pool's side of a worker process: its initializer (the process's Worker, its Requester, its
signals, the watch on its parent) and its one task (walk ranges until none is left)."""

import logging
import multiprocessing.util
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import logs
from .errors import DatabaseGone, EtlError, Stop
from .requester import Requester
from .worker import Worker

if TYPE_CHECKING:
    from multiprocessing.synchronize import Semaphore

    from .catalog import Target
    from .planner import Range
    from .providers.base import Provider
    from .ratelimit import RateLimiter
    from .settings import Settings
    from .shape import Shape
    from .shared import SharedState

log = logging.getLogger(__name__)

PARENT_CHECK_SECONDS = 0.5


def watch_parent(parent: int) -> None:
    """In a pool process: end it within PARENT_CHECK_SECONDS of its parent's death (a SIGKILL of the
    parent alone), so that nothing goes on sending requests with nobody to report to. Its connections
    close with it; its claims go with the run's lease."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_worker: Worker | None = None


def init_worker(
    settings: "Settings",
    target: "Target",
    ranges: Sequence["Range"],
    shared: "SharedState",
    limiter: "RateLimiter",
    slots: "Semaphore",
    shape: "Shape",
    embedder: "Provider",
    run_id: str,
    identity: Mapping[str, Any],
) -> None:
    """Pool initializer: runs once in each new worker process."""
    global _worker
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop. SIGTERM
    # from the parent (pool.terminate after the grace period) ends the process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(os.getppid())
    number = shared.register_worker()
    logs.set_process_name(f"w{number}")
    requester = Requester(settings, embedder, shared, limiter, slots, shape)
    _worker = Worker(settings, target, ranges, shared, requester, number, run_id, identity)
    multiprocessing.util.Finalize(_worker, _worker.close, exitpriority=10)


def embed_ranges(_task: object) -> None:
    """Pool task (one per process): walk ranges until none is left.
    A fatal error stops every worker and reaches the parent as a one-line EtlError."""
    worker = _worker
    assert worker is not None  # set by init_worker
    if worker.shared.stopping():
        return
    worker.shared.set_busy(True)
    try:
        worker.open()
        worker.run()
    except Stop:
        return
    except EtlError as error:
        worker.shared.request_stop(fatal=True)
        log.debug("fatal error", exc_info=True)
        kind = DatabaseGone if isinstance(error, DatabaseGone) else EtlError  # serve waits for the database
        raise kind(str(error)) from None
    except Exception as error:  # a bug: stop everything, keep the traceback in the log
        worker.shared.request_stop(fatal=True)
        log.error("unexpected error in worker", exc_info=True)
        raise EtlError(f"unexpected error in worker w{worker.number}: {type(error).__name__}: {error}") from None
    finally:
        worker.shared.set_busy(False)
