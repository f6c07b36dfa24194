"""The image encoder worker process (see :mod:`oxe_envlogger.collect.encoders`).

Reads 30-byte jobs from the pipe all workers share on stdin (frame offset in the shared ring,
shape, format, quality), writes ``job id, status, length`` and the encoded bytes on its own
stdout; exits when stdin closes.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys

from oxe_envlogger.collect.encoders import _FORMATS, _JOB, _RESULT
from oxe_envlogger.format import codecs
from oxe_envlogger.format.codecs import ImageCodec

_FORMAT_NAMES = {v: k for k, v in _FORMATS.items()}


def main(ring_fd: str, size: int) -> int:
    # A terminal's Ctrl-C or a service manager's SIGTERM may reach the workers too; they keep
    # encoding what the logger still holds, and exit when the logger closes their pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = int(ring_fd)  # inherited from the logger
    try:
        ring = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(ring)  # frames are encoded in place (JPEG) or copied once (fpng)
    out = sys.stdout.buffer
    out.write(_RESULT.pack(-1, 0, 0))
    out.flush()
    codec_cache: dict[tuple[int, int], ImageCodec] = {}
    while True:
        # Unbuffered: a read-ahead would take jobs that another worker could do now. Jobs are
        # written whole in writes of at most PIPE_BUF bytes, so a read gets one whole job.
        header = os.read(0, _JOB.size)
        if len(header) < _JOB.size:
            out.flush()
            os._exit(0)  # the logger closed (or died): exit now, skipping interpreter teardown
        job, offset, h, w, c, fmt, quality = _JOB.unpack(header)
        try:
            codec = codec_cache.get((fmt, quality))
            if codec is None:
                codec = codec_cache[(fmt, quality)] = ImageCodec(_FORMAT_NAMES[fmt], quality)
            data = codecs.encode_raw(view[offset: offset + h * w * c], (h, w, c), codec)
            out.write(_RESULT.pack(job, 0, len(data)) + data)
        except Exception as e:  # reported with the frame
            msg = f"{type(e).__name__}: {e}".encode()
            out.write(_RESULT.pack(job, 1, len(msg)) + msg)
        out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
