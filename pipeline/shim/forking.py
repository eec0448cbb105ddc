"""Emitters across ``os.fork()`` (gunicorn's pre-fork workers, ``multiprocessing``).

A forked child has a copy of the parent's memory but only the thread that forked:
no sender thread, and the copied outbox may even hold a lock that a vanished
thread had taken. So, from :func:`os.register_at_fork`, every live emitter in the
child gets a fresh outbox (empty, counts at zero, a new producer id so the worker
does not take its records for copies of the parent's) and, for an
:class:`~pipeline.shim.emitter.Emitter`, a new sender thread started by its first
emit. Events the parent had buffered stay the parent's: they are sent once, by
it. At the child's exit its emitters are closed as in any process: from
``atexit``, and in a ``multiprocessing`` child (which ends with ``os._exit``, so
``atexit`` does not run) from a multiprocessing finalizer. A child that ends
with ``os._exit`` itself must call ``close()`` first.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from typing import Any, Protocol

__all__ = ["Forkable", "track"]

log = logging.getLogger("commpipe.shim")


class Forkable(Protocol):
    def _after_fork_in_child(self) -> None: ...

    def close(self) -> Any: ...


_lock = threading.Lock()
_live: weakref.WeakSet[Forkable] = weakref.WeakSet()


def track(emitter: Forkable) -> None:
    """Have ``emitter`` made whole again in every forked child."""
    with _lock:
        _live.add(emitter)


def _before() -> None:
    _lock.acquire()  # so that the child's copy of the set is not half-changed


def _after_in_parent() -> None:
    _lock.release()


def _after_in_child() -> None:
    global _lock
    emitters = list(_live)
    _lock = threading.Lock()  # the copy is held (by the parent's _before)
    mp_util = sys.modules.get("multiprocessing.util")
    for emitter in emitters:
        try:
            emitter._after_fork_in_child()
            if mp_util is not None:  # runs in a multiprocessing child, after its own reset
                mp_util.register_after_fork(emitter, _close_at_multiprocessing_exit)
        except Exception:  # noqa: BLE001 - a fork must never fail because of telemetry
            log.exception("commpipe shim: could not renew an emitter after fork()")


def _close_at_multiprocessing_exit(emitter: Forkable) -> None:
    import multiprocessing.util

    ref = weakref.ref(emitter)

    def close() -> None:
        e = ref()
        if e is not None:
            e.close()

    multiprocessing.util.Finalize(emitter, close, exitpriority=10)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before, after_in_parent=_after_in_parent,
                        after_in_child=_after_in_child)
