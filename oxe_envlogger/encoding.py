"""Image encoding off the control thread: worker processes (default) or threads.

The fastest PNG encoder here (fpng) holds the GIL for the whole encode, so encoder *threads* would
stall the env loop; encoding runs in worker processes instead. Frames travel through one shared
memory ring (a file in /dev/shm, mapped by every worker): the control thread copies a frame into
a free slot and writes a 30-byte job to a worker's stdin; the worker writes the encoded bytes
back on its stdout, where a collector thread completes the frame's future and frees the slot.
When every slot is taken the control thread blocks (lossless) and the stall is counted.

Workers are plain ``python -m oxe_envlogger._encode_worker`` subprocesses (not ``multiprocessing``,
which would re-import the user's ``__main__``); they exit when their stdin closes, so a killed
logger does not leave them behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from oxe_envlogger import codecs
from oxe_envlogger.errors import WriterError
from oxe_envlogger.specs import ImageCodec

log = logging.getLogger(__name__)

_JOB = struct.Struct("<qQIIIBB")  # job id, slot offset, height, width, channels, format, quality
_RESULT = struct.Struct("<qBQ")  # job id, status (0 ok, 1 error), payload length
_FORMATS = {"png": 0, "jpeg": 1}
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BYTES = 1 << 20


class Stalls:
    """Time the control thread spent blocked on the writer."""

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.longest = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.longest = max(self.longest, seconds)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "seconds": round(self.seconds, 6),
                "longest_seconds": round(self.longest, 6)}


class EncodedFrame:
    """A frame being encoded; ``result()`` waits for its bytes. Lighter than a Future (no lock
    per frame): completion is signalled on the pool's one condition variable."""

    __slots__ = ("_done", "data", "error")

    def __init__(self, done: threading.Condition):
        self._done = done
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def result(self, timeout: float | None = None) -> bytes:
        if self.data is None and self.error is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._done:
                while self.data is None and self.error is None:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError("image encoding timed out")
                    self._done.wait(1.0)
        if self.error is not None:
            raise self.error
        return self.data

    def _finish(self, data: bytes | None, error: BaseException | None = None) -> None:
        self.data, self.error = data, error
        with self._done:
            self._done.notify_all()


def done_frame(data: bytes) -> EncodedFrame:
    """An already encoded frame."""
    frame = EncodedFrame(_DONE)
    frame.data = data
    return frame


_DONE = threading.Condition()


class ThreadEncodePool:
    """Encoder threads (for one-core machines, or when worker processes cannot start)."""

    kind = "threads"

    def __init__(self, threads: int | None = None, max_pending: int = 256,
                 stalls: Stalls | None = None):
        self._threads_wanted = threads or min(4, os.cpu_count() or 1)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._threads: list[threading.Thread] = []
        self._done = threading.Condition()
        self.stalls = stalls or Stalls()
        self.frames = 0
        self.encode_seconds = 0.0

    def _start(self) -> None:
        for i in range(self._threads_wanted):
            t = threading.Thread(target=self._run, name=f"oxe-encode-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            pixels, shape, codec, frame = job
            try:
                t0 = time.perf_counter()
                data = codecs.encode_raw(pixels, shape, codec)
                self.encode_seconds += time.perf_counter() - t0
                self.frames += 1
                frame._finish(data)
            except BaseException as e:  # delivered to the writer through the frame
                frame._finish(None, e)
            finally:
                self._slots.release()

    def submit(self, image: np.ndarray, codec: ImageCodec) -> EncodedFrame:
        """Starts encoding a uint8 (H, W, C) frame (copied now); returns it."""
        if not self._threads:
            self._start()
        pixels = image.tobytes()
        if not self._slots.acquire(blocking=False):
            t0 = time.perf_counter()
            self._slots.acquire()
            self.stalls.add(time.perf_counter() - t0)
        frame = EncodedFrame(self._done)
        self._queue.put((pixels, image.shape, codec, frame))
        return frame

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []


class _Worker:
    def __init__(self, shm_path: str, size: int, index: int):
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oxe_envlogger._encode_worker", shm_path, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        # Room for several encoded frames in the pipe, so a worker rarely waits for the
        # collector thread (which needs the GIL) before taking the next frame.
        for pipe in (self.proc.stdout, self.proc.stdin):
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        self.index = index
        self.outstanding: dict[int, tuple[EncodedFrame, int]] = {}
        self.lock = threading.Lock()
        self.dead = False

    def read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.proc.stdout.readinto(view[got:])
            if not k:
                raise EOFError("encoder worker exited")
            got += k
        return bytes(buf)


class ProcessEncodePool:
    """Encoder worker processes fed through a shared-memory ring of frame slots.

    Args:
      workers: number of worker processes.
      slot_bytes: bytes of the largest frame.
      slots: frames that may wait for encoding before ``submit`` blocks.
      stalls: where blocked time is counted.

    Raises:
      OSError: when the ring or a worker cannot be created (callers fall back to threads).
    """

    kind = "processes"

    def __init__(self, workers: int, slot_bytes: int, slots: int = 64,
                 stalls: Stalls | None = None):
        self.stalls = stalls or Stalls()
        self.slot_bytes = int(slot_bytes)
        self.frames = 0
        self.encode_seconds = 0.0  # not measured across processes
        size = self.slot_bytes * slots
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, self._path = tempfile.mkstemp(prefix="oxe_frames_", dir=shm_dir)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._ring = np.frombuffer(self._map, dtype=np.uint8)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(slots):
            self._free.put(i * self.slot_bytes)
        self._ids = itertools.count()
        self._next_worker = itertools.cycle(range(workers))
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._workers: list[_Worker] = []
        self._collectors: list[threading.Thread] = []
        try:
            for i in range(workers):
                self._workers.append(_Worker(self._path, size, i))
            for w in self._workers:  # wait until each has mapped the ring
                header = w.read_exact(_RESULT.size)
                if _RESULT.unpack(header)[0] != -1:
                    raise OSError("encoder worker did not start")
        except BaseException:
            self.shutdown()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)  # mapped by everyone; nothing to leak from now on
        for w in self._workers:
            t = threading.Thread(target=self._collect, args=(w,), name=f"oxe-encode-rx-{w.index}",
                                 daemon=True)
            t.start()
            self._collectors.append(t)

    def submit(self, image: np.ndarray, codec: ImageCodec) -> EncodedFrame:
        """Copies a uint8 (H, W, C) frame into the ring and hands it to a worker."""
        if self._error is not None:
            raise WriterError(f"image encoding failed: {self._error}") from self._error
        n = image.size
        if n > self.slot_bytes:
            raise ValueError(f"frame of {n} bytes exceeds the ring's slot of {self.slot_bytes}")
        try:
            offset = self._free.get_nowait()
        except queue.Empty:
            t0 = time.perf_counter()
            while True:
                try:
                    offset = self._free.get(timeout=1.0)
                    break
                except queue.Empty:
                    if self._error is not None:
                        raise WriterError(f"image encoding failed: {self._error}") from None
            self.stalls.add(time.perf_counter() - t0)
        self._ring[offset: offset + n].reshape(image.shape)[...] = image
        frame = EncodedFrame(self._done)
        job = next(self._ids)
        worker = self._workers[next(self._next_worker)]
        h, w_, c = image.shape
        with worker.lock:
            worker.outstanding[job] = (frame, offset)
        try:
            worker.proc.stdin.write(_JOB.pack(job, offset, h, w_, c, _FORMATS[codec.format],
                                              codec.quality))
        except (BrokenPipeError, OSError) as e:
            self._fail(e)
            raise WriterError(f"image encoding failed: {e}") from e
        return frame

    def _collect(self, worker: _Worker) -> None:
        """Completes frames as results arrive. Reads whatever the pipe holds at once and
        handles every whole result in it, so one wake-up (one GIL acquisition) serves many."""
        fd = worker.proc.stdout.fileno()
        buf = bytearray()
        head = _RESULT.size
        try:
            while True:
                chunk = os.read(fd, _PIPE_BYTES)
                if not chunk:
                    raise EOFError
                buf += chunk
                pos = 0
                while len(buf) - pos >= head:
                    job, status, length = _RESULT.unpack_from(buf, pos)
                    end = pos + head + length
                    if end > len(buf):
                        break
                    payload = bytes(buf[pos + head: end])
                    pos = end
                    with worker.lock:
                        frame, offset = worker.outstanding.pop(job)
                    self._free.put(offset)
                    if status == 0:
                        self.frames += 1
                        frame._finish(payload)
                    else:
                        frame._finish(None, WriterError(payload.decode("utf-8", "replace")))
                del buf[:pos]
        except EOFError:
            if worker.outstanding or not self._closing:
                self._fail(WriterError(f"encoder worker {worker.index} exited (code "
                                       f"{worker.proc.poll()}) with {len(worker.outstanding)} "
                                       "frames in flight"))
        except BaseException as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("image encoding failed: %s", error)
        for w in self._workers:
            with w.lock:
                pending, w.outstanding = w.outstanding, {}
            for frame, offset in pending.values():
                if frame.data is None and frame.error is None:
                    frame._finish(None, WriterError(f"image encoding failed: {error}"))
                self._free.put(offset)

    def shutdown(self) -> None:
        self._closing = True
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        for t in self._collectors:  # each ends when its worker closes stdout (it is exiting)
            t.join(timeout=60)
        for w in self._workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
        self._workers = []
        self._collectors = []


def make_pool(processes: int | None, max_pending: int, slot_bytes: int,
              stalls: Stalls) -> ThreadEncodePool | ProcessEncodePool:
    """Worker processes when asked for (or by default with 2+ CPUs), threads otherwise."""
    cpus = os.cpu_count() or 1
    if processes is None:
        processes = 0 if cpus < 2 else min(4, cpus)
    if processes > 0 and sys.platform.startswith("linux"):
        try:
            return ProcessEncodePool(processes, slot_bytes, slots=max(8, max_pending),
                                     stalls=stalls)
        except OSError as e:
            log.warning("image encoder processes unavailable (%s); using threads", e)
    return ThreadEncodePool(None, max_pending, stalls)
