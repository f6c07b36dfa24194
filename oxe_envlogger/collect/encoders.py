"""Image encoding off the control thread: worker processes (default) or threads.

The fastest PNG encoder here (fpng) holds the GIL for the whole encode, so encoder *threads* would
stall the env loop; encoding runs in worker processes instead. Frames travel through one shared
memory ring (an anonymous memory file, memfd, reserved up front and mapped by every worker; see
:func:`_open_ring` and :func:`_reserve`): the control thread copies a step's
frames into free slots and writes their 30-byte jobs, in one write, to the pipe all workers read
(whichever worker is free takes the next job); each worker writes the encoded bytes back on its
own stdout. When every slot is taken the control thread blocks (lossless) and the stall is
counted. Workers run in a session of their own and ignore SIGINT and SIGTERM, so a terminal's
Ctrl-C (sent to the whole process group) lets the logger write what it holds.

Results are read back in batches by whichever thread needs them (no collector thread, so
nothing else competes with the env loop for the GIL). Workers are plain
``python -m oxe_envlogger.collect._encode_worker`` subprocesses (not ``multiprocessing``,
which would re-import the user's ``__main__``); they exit when their stdin closes, so a killed
logger does not leave them behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import queue
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import numpy as np

from oxe_envlogger.errors import WriterError
from oxe_envlogger.format import codecs
from oxe_envlogger.format.codecs import ImageCodec

log = logging.getLogger(__name__)

_JOB = struct.Struct("<qQIIIBB")  # job id, slot offset, height, width, channels, format, quality
_RESULT = struct.Struct("<qBQ")  # job id, status (0 ok, 1 error), payload length
_FORMATS = {"png": 0, "jpeg": 1}
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_MIN_SLOTS = 4  # frames the ring holds at least
_RING_MAX_BYTES = 256 << 20  # and at most this much memory: fewer slots for large frames
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    """A frame being encoded; ``result()`` waits for its bytes. Lighter than a Future: no lock
    per frame; the pool that encodes it says how to wait."""

    __slots__ = ("_pool", "data", "error")

    def __init__(self, pool: Any):
        self._pool = pool
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def result(self) -> bytes:
        if self.data is None and self.error is None:
            self._pool.wait(self)
        if self.error is not None:
            raise self.error
        return self.data


def done_frame(data: bytes) -> EncodedFrame:
    """An already encoded frame."""
    frame = EncodedFrame(None)
    frame.data = data
    return frame


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
        self.bytes_out = 0  # encoded bytes of those frames

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
                data = codecs.encode_raw(pixels, shape, codec)
                self.frames += 1
                self.bytes_out += len(data)
                frame.data = data
            except BaseException as e:  # delivered to the writer through the frame
                frame.error = e
            finally:
                self._slots.release()
                with self._done:
                    self._done.notify_all()

    def wait(self, frame: EncodedFrame) -> None:
        with self._done:
            while frame.data is None and frame.error is None:
                self._done.wait(1.0)

    def submit_many(self, images: list[tuple[np.ndarray, ImageCodec]]) -> list[EncodedFrame]:
        """Starts encoding uint8 (H, W, C) frames (copied now); returns them."""
        if not self._threads:
            self._start()
        frames = []
        for image, codec in images:
            pixels = image.tobytes()
            if not self._slots.acquire(blocking=False):
                t0 = time.perf_counter()
                self._slots.acquire()
                self.stalls.add(time.perf_counter() - t0)
            frame = EncodedFrame(self)
            self._queue.put((pixels, image.shape, codec, frame))
            frames.append(frame)
        return frames

    def cpu_seconds(self) -> None:
        """Encoder threads share the logger's process: their CPU time is not told apart."""
        return None

    def worker_processes(self) -> list[subprocess.Popen]:
        """The encoder worker processes: none, the encoders are threads."""
        return []

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []


class _Worker:
    def __init__(self, ring_fd: int, size: int, index: int, jobs_fd: int):
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        # The encoder never calls BLAS; without this, numpy's OpenBLAS starts a thread per CPU
        # that busy-waits about 0.1 s after start-up, on the CPUs the env loop needs.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        args = [sys.executable, "-m", "oxe_envlogger.collect._encode_worker", str(ring_fd), str(size)]
        # A session of its own: a terminal's Ctrl-C reaches the logger, not its encoders. Run
        # from the directory holding this very package: ``-m`` looks in the working directory
        # first, and the user's may hold another copy of oxe_envlogger.
        self.proc = subprocess.Popen(args, stdin=jobs_fd, pass_fds=(ring_fd,),
                                     stdout=subprocess.PIPE, env=env, bufsize=0,
                                     start_new_session=True, cwd=_PACKAGE_PARENT)
        # Room for many encoded frames in the pipe: results are read in batches.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.proc.stdout.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        self.fd = self.proc.stdout.fileno()
        self.index = index
        # Results are read into one preallocated buffer: [start, end) holds unparsed bytes.
        self.buffer = bytearray(_PIPE_BYTES)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0
        self.eof = False

    def make_room(self, need: int) -> None:
        """Moves the unparsed bytes to the front of the buffer, growing it to hold ``need``
        bytes (a result larger than the buffer)."""
        pending = self.end - self.start
        if need > len(self.buffer):
            grown = bytearray(need)
            grown[:pending] = self.buffer[self.start: self.end]
            self.buffer, self.view = grown, memoryview(grown)
        elif pending:
            self.view[:pending] = self.view[self.start: self.end]
        self.start, self.end = 0, pending

    def read_exact(self, n: int) -> bytes:
        """Blocking read of ``n`` bytes (only at start, before the fd turns non-blocking)."""
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.fd, n - len(buf))
            if not chunk:
                # an OSError, so that make_pool falls back to threads (its stderr says why)
                raise OSError(f"encoder worker exited at start-up (code {self.proc.wait()})")
            buf += chunk
        return bytes(buf)


class ProcessEncodePool:
    """Encoder worker processes fed through a shared-memory ring of frame slots.

    Every worker reads its jobs from one shared pipe (30-byte jobs, written whole and read
    whole, so each goes to exactly one worker): whichever worker is free takes the next frame.

    There is no collector thread: results are drained from the workers' pipes by whichever
    thread needs them (the control thread, without blocking, when it submits a frame; the
    writer thread when it waits for a frame), so no extra thread competes for the GIL.

    Args:
      workers: number of worker processes.
      slot_bytes: bytes of the largest frame.
      slots: frames that may wait for encoding before ``submit`` blocks (at most 256 MiB of
        them, and fewer when shared memory is short: see :func:`_reserve`).
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
        self.bytes_out = 0  # encoded bytes of those frames
        slots = max(_MIN_SLOTS, min(slots, _RING_MAX_BYTES // max(1, self.slot_bytes)))
        ring_fd, where = _open_ring()
        try:
            slots = _reserve(ring_fd, self.slot_bytes, slots, where)
            size = self.slot_bytes * slots
            self._map = mmap.mmap(ring_fd, size)
        except BaseException:
            os.close(ring_fd)
            raise
        self._ring = np.frombuffer(self._map, dtype=np.uint8)
        self._free: list[int] = [i * self.slot_bytes for i in range(slots)]
        self._low_water = max(2, slots // 2)
        self._ids = itertools.count()
        self._outstanding: dict[int, tuple[EncodedFrame, int]] = {}  # job id: (frame, slot)
        self._rx = threading.Lock()  # one drainer at a time
        self._error: BaseException | None = None
        self._closing = False
        self._workers: list[_Worker] = []
        self._jobs_w: int | None = None
        self._cpu_done = self._cpu_start = 0.0  # see cpu_seconds()
        jobs_r, self._jobs_w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._jobs_w, _F_SETPIPE_SZ, _PIPE_BYTES)
            for i in range(workers):
                self._workers.append(_Worker(ring_fd, size, i, jobs_r))
            for w in self._workers:  # wait until each has mapped the ring
                if _RESULT.unpack(w.read_exact(_RESULT.size))[0] != -1:
                    raise OSError("encoder worker did not start")
                os.set_blocking(w.fd, False)
            self._cpu_start = self.cpu_seconds()  # interpreter start-up is not encoding
        except BaseException:
            self.shutdown()
            raise
        finally:
            os.close(jobs_r)  # the workers hold it; EOF reaches them when the logger goes
            os.close(ring_fd)  # mapped by everyone; the memory goes with the last mapping
        self._poll = select.poll()
        for w in self._workers:
            self._poll.register(w.fd, select.POLLIN)
        _LIVE_POOLS.add(self)

    def _forget_in_fork_child(self) -> None:
        """In a child forked from the logger's process (multiprocessing, an async vector env):
        drops the inherited pipe ends, so that the workers still see EOF when the logger closes
        (they lingered as long as the child lived), and makes this copy of the pool refuse
        work: the encoders belong to the parent."""
        self._error = WriterError("the image encoders belong to the process that started "
                                  "the logger, not to a forked child")
        if self._jobs_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._jobs_w)
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.proc.stdout.close()  # through its file object, which would close it later
        self._jobs_w = None
        self._workers = []
        self._outstanding = {}

    # -- control thread -------------------------------------------------------------------------

    def submit_many(self, images: list[tuple[np.ndarray, ImageCodec]]) -> list[EncodedFrame]:
        """Copies the frames of one step into the ring and hands them over with one write
        (a write that wakes a sleeping worker costs the caller about 20 us on a VM: one per
        step, not one per camera). A frame larger than the ring's slots (a metadata image that
        first appears late) is encoded here, at once."""
        if self._error is not None:
            raise WriterError(f"image encoding failed: {self._error}") from self._error
        if len(self._free) < self._low_water:
            self._drain(0.0)  # free the slots of finished frames (cheap, but not free: syscalls)
        frames = []
        jobs: list[bytes] = []
        for image, codec in images:
            n = image.size
            if n > self.slot_bytes:
                frames.append(done_frame(codecs.encode(np.ascontiguousarray(image), codec)))
                continue
            if not self._free:
                self._send(jobs)  # what is waited for must reach the workers first
                jobs = []
                t0 = time.perf_counter()
                while not self._free:
                    self._drain(0.05)
                    if self._error is not None:
                        raise WriterError(f"image encoding failed: {self._error}") from self._error
                self.stalls.add(time.perf_counter() - t0)
            offset = self._free.pop()
            self._ring[offset: offset + n].reshape(image.shape)[...] = image
            frame = EncodedFrame(self)
            job = next(self._ids)
            h, w, c = image.shape
            self._outstanding[job] = (frame, offset)
            jobs.append(_JOB.pack(job, offset, h, w, c, _FORMATS[codec.format], codec.quality))
            frames.append(frame)
        self._send(jobs)
        return frames

    def _send(self, jobs: list[bytes]) -> None:
        """Writes whole jobs to the shared pipe in writes of at most PIPE_BUF bytes (atomic),
        so a worker's 30-byte read never gets part of a job."""
        per_write = select.PIPE_BUF // _JOB.size
        for i in range(0, len(jobs), per_write):
            data = b"".join(jobs[i: i + per_write])
            try:
                if os.write(self._jobs_w, data) != len(data):
                    raise OSError("short write to the encoder job pipe")
            except OSError as e:
                self._fail(e)
                raise WriterError(f"image encoding failed: {e}") from e

    # -- any thread -------------------------------------------------------------------------------

    def wait(self, frame: EncodedFrame) -> None:
        """Drains results until ``frame`` is done (or the pool failed)."""
        while frame.data is None and frame.error is None:
            self._drain(0.05)

    def _drain(self, timeout: float) -> None:
        """Reads whatever results are waiting (waiting up to ``timeout`` seconds for some) and
        completes their frames. Another thread draining already does the work for this one."""
        locked = self._rx.acquire(timeout=timeout) if timeout > 0 else self._rx.acquire(False)
        if not locked:
            return
        try:
            if timeout > 0:
                self._poll.poll(timeout * 1000)
            for w in self._workers:
                if w.start != w.end:  # results read before, left unparsed by an interrupt
                    self._parse(w)
                if w.eof:
                    continue
                while True:
                    if w.end == len(w.buffer):
                        w.make_room(len(w.buffer))
                    space = len(w.buffer) - w.end
                    try:
                        n = os.readv(w.fd, [w.view[w.end:]])
                    except BlockingIOError:
                        break
                    if not n:
                        w.eof = True
                        self._poll.unregister(w.fd)
                        if self._outstanding or not self._closing:
                            self._fail(WriterError(
                                f"encoder worker {w.index} exited (code {w.proc.poll()}) "
                                f"with {len(self._outstanding)} frames in flight"))
                        break
                    w.end += n
                    self._parse(w)
                    if n < space:
                        break
        finally:
            self._rx.release()

    def _parse(self, w: _Worker) -> None:
        view, head, pos, end = w.view, _RESULT.size, w.start, w.end
        while end - pos >= head:
            job, status, length = _RESULT.unpack_from(view, pos)
            stop = pos + head + length
            if stop > end:
                if stop > len(w.buffer):  # the rest of this result does not fit behind it
                    w.start = pos
                    w.make_room(head + length)
                    return
                break
            payload = bytes(view[pos + head: stop])
            pos = stop
            entry = self._outstanding.pop(job, None)
            if entry is None:
                continue
            frame, offset = entry
            self._free.append(offset)
            if status == 0:
                self.frames += 1
                self.bytes_out += length
                frame.data = payload
            else:
                frame.error = WriterError(payload.decode("utf-8", "replace"))
        if pos == end:
            w.start = w.end = 0
        else:
            w.start = pos

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("image encoding failed: %s", error)
        pending, self._outstanding = self._outstanding, {}
        for frame, offset in pending.values():
            if frame.data is None and frame.error is None:
                frame.error = WriterError(f"image encoding failed: {error}")
            self._free.append(offset)

    def shutdown(self) -> None:
        self._closing = True
        if self._jobs_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._jobs_w)  # the workers finish the jobs queued, then exit
            self._jobs_w = None
        deadline = time.monotonic() + 60
        while (self._outstanding and not all(w.eof for w in self._workers)
               and time.monotonic() < deadline):
            self._drain(0.05)  # collect what is still in flight
        self._cpu_done, self._cpu_start = self.cpu_seconds(), 0.0
        for w in self._workers:  # they exit by themselves now; reap them off this thread
            if w.proc.poll() is None:
                threading.Thread(target=_reap, args=(w.proc,), daemon=True).start()
        self._workers = []

    def worker_processes(self) -> list[subprocess.Popen]:
        """The live encoder worker processes (for their ids, or to signal them in a test)."""
        return [w.proc for w in self._workers]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the workers have used since they started."""
        live = sum(_process_cpu_seconds(w.proc.pid) for w in self._workers)
        return self._cpu_done + live - self._cpu_start


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_LIVE_POOLS):
        pool._forget_in_fork_child()
    _LIVE_POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


_USE_MEMFD = hasattr(os, "memfd_create")


def _open_ring() -> tuple[int, str]:
    """A file descriptor for the frame ring, and where it lives (for messages): an anonymous
    memory file (memfd) where the kernel has them, which no ``/dev/shm`` size limit applies
    to (a container's is 64 MiB by default) and which nothing can leak; else an unlinked file
    in ``/dev/shm``."""
    if _USE_MEMFD:
        try:
            return os.memfd_create("oxe_frames", os.MFD_CLOEXEC), "shared memory (memfd)"
        except OSError:  # e.g. a seccomp profile without memfd_create
            pass
    where = _shm_dir()
    fd, path = tempfile.mkstemp(prefix="oxe_frames_", dir=where)
    os.unlink(path)  # the descriptor is what the workers get
    return fd, where


def _reserve(fd: int, slot_bytes: int, slots: int, where: str) -> int:
    """Sizes the ring file and reserves its memory now, halving the slots while there is not
    room for them; returns the slots reserved.

    A tmpfs (``/dev/shm``) allocates a page only when it is first written, and a write to a
    mapped page that no longer fits kills the process with SIGBUS, taking every episode it
    holds with it. Containers get a 64 MiB ``/dev/shm`` by default, a tenth of 64 slots of
    1080p frames.

    Raises:
      OSError: when not even ``_MIN_SLOTS`` frames fit (the caller falls back to threads).
    """
    wanted = slots
    while True:
        os.ftruncate(fd, 0)  # drops what a failed attempt allocated
        os.ftruncate(fd, slot_bytes * slots)
        try:
            os.posix_fallocate(fd, 0, slot_bytes * slots)
            break
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                break  # a file system without fallocate: pages come on first write, as before
            if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):  # tmpfs, memory cgroup
                raise
            if slots // 2 < _MIN_SLOTS:
                raise OSError(e.errno, f"{where} has no room for {_MIN_SLOTS} frames of "
                              f"{slot_bytes} bytes; in a container, give it more shared "
                              "memory (docker run --shm-size=1g)") from e
            slots //= 2
    if slots < wanted:
        log.warning("%s has room for %d of the %d frames of %d bytes the image encoders "
                    "would hold; fewer frames in flight can stall step() more often (in a "
                    "container, docker run --shm-size=1g)", where, slots, wanted, slot_bytes)
    return slots


def _process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):  # already reaped
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def default_processes() -> int:
    """Encoder worker processes by default: none (threads) on one CPU, else one CPU left to
    the env loop, at most 4. With as many workers as CPUs, the workers preempt the loop (W2 on
    2 CPUs, JPEG: overhead 1.3-1.7 with one worker against 2.0-2.2 with two; PNG within 5%)."""
    cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(4, cpus - 1)


def make_pool(processes: int | None, max_pending: int, slot_bytes: int,
              stalls: Stalls) -> ThreadEncodePool | ProcessEncodePool:
    """Worker processes when asked for (or by default, see :func:`default_processes`), threads
    otherwise."""
    if processes is None:
        processes = default_processes()
    if processes > 0 and sys.platform.startswith("linux"):
        try:
            return ProcessEncodePool(processes, slot_bytes, slots=max(8, max_pending),
                                     stalls=stalls)
        except OSError as e:
            log.warning("image encoder processes unavailable (%s); using threads", e)
    return ThreadEncodePool(None, max_pending, stalls)
