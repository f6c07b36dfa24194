"""Closing loggers when the process ends early: exceptions, Ctrl-C, SIGTERM, exit without close.

Every open logger registers here. At interpreter exit the registry closes whatever is still open
(the episode in flight is kept as truncated and ``invalid``, or dropped, as the logger was told).
SIGTERM, whose default action kills the process without running exit handlers, is turned into a
``SystemExit`` in the main thread when no other handler was installed, so the same path runs.
SIGKILL cannot be caught: completed episodes are already durable and recovery collects them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


# Strong references: a logger dropped without close() (say, a local variable in a function
# left by an exception) must still be closed at exit, so nothing here may be garbage collected.
_open: dict[int, Closable] = {}
_closing = threading.Event()
_installed = False


def register(logger: Closable, *, handle_signals: bool = True) -> None:
    global _installed
    _open[id(logger)] = logger
    if not _installed:
        atexit.register(close_all)
        _installed = True
    if handle_signals:
        _install_sigterm()


def unregister(logger: Closable) -> None:
    _open.pop(id(logger), None)
    if not _open:
        _uninstall_sigterm()


def close_all() -> None:
    """Closes every registered logger (exit handler)."""
    _closing.set()
    try:
        for logger in list(_open.values()):
            try:
                logger.close()
            except Exception as e:  # keep closing the others
                log.error("closing %r at exit failed: %s", logger, e)
    finally:
        _closing.clear()


@contextlib.contextmanager
def signals_deferred():
    """Holds SIGINT and SIGTERM back for the duration (main thread only), then delivers them:
    for short sections that must not be cut in two, such as handing an episode over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _on_sigterm(signum, frame):
    if _closing.is_set():
        return  # already exiting: let the loggers finish closing
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


def _uninstall_sigterm() -> None:
    """Gives SIGTERM its default action back once no logger is open (if the handler is still
    ours): a program that closed its loggers is killed by SIGTERM as before it opened one."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):
        return
