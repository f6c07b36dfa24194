"""Closing loggers when the process ends early: exceptions, Ctrl-C, SIGTERM, exit without close.

Every open logger registers here. At interpreter exit the registry closes whatever is still open
(the episode in flight is kept as truncated and ``invalid``, or dropped, as the logger was told).
SIGTERM, whose default action kills the process without running exit handlers, is turned into a
``SystemExit`` in the main thread when no other handler was installed, so the same path runs.
SIGKILL cannot be caught: completed episodes are already durable and recovery collects them.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import weakref
from typing import Protocol

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


_open: weakref.WeakSet = weakref.WeakSet()
_closing = threading.Event()
_deferred_signal: list[int] = []
_installed = False


def register(logger: Closable, *, handle_signals: bool = True) -> None:
    global _installed
    _open.add(logger)
    if not _installed:
        atexit.register(close_all)
        _installed = True
    if handle_signals:
        _install_sigterm()


def unregister(logger: Closable) -> None:
    _open.discard(logger)


def close_all() -> None:
    """Closes every registered logger (exit handler)."""
    _closing.set()
    try:
        for logger in list(_open):
            try:
                logger.close()
            except Exception as e:  # keep closing the others
                log.error("closing %r at exit failed: %s", logger, e)
    finally:
        _closing.clear()


def _on_sigterm(signum, frame):
    if _closing.is_set():
        _deferred_signal.append(signum)  # finish closing first; exit follows
        return
    raise SystemExit(128 + signum)


def _install_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return
    if current in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
