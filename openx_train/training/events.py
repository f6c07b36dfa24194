"""TensorBoard event files written without TensorFlow or tensorboard.

An event file is a TFRecord file (framed and checksummed by :mod:`oxe_envlogger.format.record`)
of ``Event`` protocol buffers: first one with ``file_version: "brain.Event:2"``, then one per
logged step with ``wall_time``, ``step`` and ``summary.value {tag, simple_value}``, the form
TensorBoard's scalars dashboard (and ``tf.compat.v1.train.summary_iterator``) reads. The few
fields are encoded here by hand (protobuf wire format).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping

from oxe_envlogger.format import record

FILE_VERSION = "brain.Event:2"

# Field keys, (number << 3) | wire type: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
_EVENT_WALL_TIME = 1 << 3 | 1
_EVENT_STEP = 2 << 3 | 0
_EVENT_FILE_VERSION = 3 << 3 | 2
_EVENT_SUMMARY = 5 << 3 | 2
_SUMMARY_VALUE = 1 << 3 | 2
_VALUE_TAG = 1 << 3 | 2
_VALUE_SIMPLE = 2 << 3 | 5


def _delimited(key: int, payload: bytes) -> bytes:
    return bytes([key]) + record.varint(len(payload)) + payload


def encode_event(*, wall_time: float, step: int = 0, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """One serialized ``Event``: a file version, or scalars (``{tag: value}``) at ``step``."""
    out = [bytes([_EVENT_WALL_TIME]), struct.pack("<d", wall_time)]
    if step:
        out += [bytes([_EVENT_STEP]), record.varint(int(step))]
    if file_version is not None:
        out.append(_delimited(_EVENT_FILE_VERSION, file_version.encode()))
    if scalars:
        values = b"".join(
            _delimited(_SUMMARY_VALUE, _delimited(_VALUE_TAG, tag.encode())
                       + bytes([_VALUE_SIMPLE]) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out.append(_delimited(_EVENT_SUMMARY, values))
    return b"".join(out)


class EventWriter:
    """Appends scalar events to a new event file in ``directory``.

    Args:
      directory: where the file goes (created when missing); TensorBoard's ``--logdir``.
    """

    def __init__(self, directory: str | os.PathLike):
        os.makedirs(directory, exist_ok=True)
        name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}."
                f"{os.getpid()}.v2")
        self.path = os.path.join(os.fspath(directory), name)
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())
        self._file.write(record.frame(encode_event(wall_time=time.time(),
                                                   file_version=FILE_VERSION)))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event holding every value at ``step``; flushed."""
        if values:
            self._file.write(record.frame(encode_event(wall_time=time.time(), step=step,
                                                       scalars=values)))
            self._file.flush()

    def close(self) -> None:
        """Closes the file (idempotent)."""
        self._file.close()
