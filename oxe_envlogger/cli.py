"""What the command-line programs share (``tools/*.py``, ``python -m
oxe_envlogger.datasets.tfds_summary``): a quiet end when their output is closed early (piped into
``head``) and one-line error messages instead of tracebacks; and the one recover command
(``oxe-recover-rlds`` and ``tools/recover_rlds.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator

from oxe_envlogger.datasets import recovery
from oxe_envlogger.errors import DamagedShardError, OXEEnvLoggerError, RecoveryError

# What a shell reports for a program killed by SIGPIPE (Python ignores the signal itself).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


@contextlib.contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """Ends the program with :data:`EXIT_BROKEN_PIPE`, silently, when the reader of its stdout
    goes away before everything is written (``validate_rlds.py DIR | head``), instead of a
    ``BrokenPipeError`` traceback."""
    try:
        try:
            yield
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit; pointed at /dev/null, that stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(EXIT_BROKEN_PIPE)


def run(main: Callable[[list[str]], int | None], **kwargs) -> None:
    """``absl.app.run(main, **kwargs)`` inside :func:`quiet_broken_pipe`."""
    from absl import app

    with quiet_broken_pipe():
        app.run(main, **kwargs)


def error_line(error: BaseException) -> str:
    """``error: <message>`` for an error that a program reports without a traceback; for a
    damaged shard, with the command that salvages the intact records."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    line = f"error: {text}"
    if isinstance(error, DamagedShardError):
        line += (f"; tools/recover_rlds.py {os.path.dirname(error.path)} keeps every intact "
                 "record and sets the damaged file aside")
    return line


@contextlib.contextmanager
def errors_reported(*kinds: type[BaseException]) -> Iterator[None]:
    """Reports the errors a program expects (this package's, ``OSError``, ``ValueError``,
    ``KeyError`` and ``kinds``) as one :func:`error_line` on stderr and exits with status 1.
    A closed stdout is not one of them: it is left to :func:`quiet_broken_pipe`."""
    try:
        yield
    except BrokenPipeError:
        raise
    except (OXEEnvLoggerError, OSError, ValueError, KeyError, *kinds) as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(1)


def recover_main(argv: list[str] | None = None) -> int:
    """``oxe-recover-rlds DIR [DIR ...]`` (and ``tools/recover_rlds.py``): runs
    :func:`oxe_envlogger.datasets.recovery.recover` on each directory and prints its report as one
    JSON line. Returns 1 when any directory could not be recovered (the
    reason on stderr, one line each), 2 for bad usage."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: oxe-recover-rlds DIR [DIR ...]", file=sys.stderr)
        return 2
    status = 0
    with quiet_broken_pipe():
        for d in args:
            try:
                report = recovery.recover(d)
            except RecoveryError as e:
                print(json.dumps({"directory": d, **e.report}))
                print(error_line(e), file=sys.stderr)
                status = 1
            except (OXEEnvLoggerError, OSError, ValueError) as e:
                print(error_line(e), file=sys.stderr)
                status = 1
            else:
                print(json.dumps({"directory": d, **report}))
    return status


