"""Which frames each batch holds, in numpy: the one index sampler of every loader (state-only
batches gather from it in numpy; camera batches feed it into their ``tf.data`` pipeline).

Everything is counter-based and stateless:

* :func:`uniforms`: ``[0, 1)`` draws from a splitmix64 hash of ``(seed, stream, batch,
  position)``; a batch's draws never depend on another batch's.
* :func:`permute`: element ``p`` of a random permutation of ``[0, n)`` per ``(seed, stream,
  epoch)``: keyed add-multiply-xorshift rounds, a bijection of the smallest power of two that
  holds ``n``, walked until it lands in range (fewer than 2 walks on average); no memory.
* :class:`TrainSampler`: per training batch ``b``, ``B`` domains drawn by weight from
  ``uniforms(seed, DOMAIN, b)``; each draw takes the next position of its domain's stream of
  frames (one permutation per epoch; process ``i`` of ``n`` takes positions ``i, i + n, ...``,
  so the processes' shares are disjoint); the goal uniforms come from ``uniforms(seed, GOAL,
  b)``. The domain counters at batch ``b`` are the domain counts of batches ``0 .. b - 1``,
  computed without drawing any frame (a vectorized count per skipped batch), so a loader
  started at ``start_batch=k`` gives exactly the batches an uninterrupted one gives from ``k``.

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 4
_SKIP_CHUNK = 4096  # batches whose domain draws are counted at once when skipping
_CACHED_EPOCH = 1 << 20  # domains up to this many frames keep whole epoch permutations (8 MB)

# Streams: independent families of draws under one seed.
DOMAIN, GOAL, PERMUTATION = 1, 2, 3


def mix64(x: Any) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_words(*words: Any) -> np.ndarray:
    """A 64-bit key of a sequence of integer words (each an int or an int array; they
    broadcast)."""
    h = np.asarray(_GOLDEN, np.uint64)
    for w in words:
        with np.errstate(over="ignore"):
            h = mix64(h ^ np.asarray(w).astype(np.uint64)) + _GOLDEN
    return h


def uniforms(seed: int, stream: int, batches: Any, count: int) -> np.ndarray:
    """float64 ``[..., count]`` draws in ``[0, 1)`` for each batch number of ``batches``."""
    key = hash_words(seed, stream, np.asarray(batches, np.int64))[..., None]
    with np.errstate(over="ignore"):
        bits = mix64(key + np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(position: Any, size: Any, *, seed: int, stream: Any, epoch: Any) -> np.ndarray:
    """Element ``position`` of a random permutation of ``[0, size)``, one permutation per
    ``(seed, stream, epoch)``; elementwise on int arrays (they broadcast), stateless.

    A keyed bijection of ``[0, 2**k)``, the smallest power of two holding ``size``, walked
    until it lands in range (fewer than 2 walks on average).

    Raises:
      ValueError: for a position outside ``[0, size)``.
    """
    position, size = np.broadcast_arrays(np.asarray(position, np.int64),
                                         np.asarray(size, np.int64))
    if position.size and (np.any(position < 0) or np.any(position >= size)):
        raise ValueError(f"permute: positions must be in [0, size); given {position.min()}.."
                         f"{position.max()} for sizes {size.min()}..{size.max()}")
    bits = np.ceil(np.log2(np.maximum(size, 2))).astype(np.uint64)
    one_key = np.ndim(stream) == 0 and np.ndim(epoch) == 0  # one permutation: keys once
    base = hash_words(seed, PERMUTATION, stream, epoch)
    if not one_key:
        base = np.broadcast_to(base, position.shape)
    adds = np.stack([hash_words(base, r) for r in range(_ROUNDS)])
    muls = mix64(adds) | np.uint64(1)
    x = position.astype(np.uint64)
    todo = np.ones(x.shape, bool)
    while todo.any():  # cycle walking: each element ends in range, its cycle passes there
        keys = (adds, muls) if one_key else (adds[:, todo], muls[:, todo])
        x[todo] = _bijection(x[todo], bits[todo], *keys)
        todo = x >= size.astype(np.uint64)
    return x.astype(np.int64)


def _bijection(x: np.ndarray, bits: np.ndarray, adds: np.ndarray, muls: np.ndarray
               ) -> np.ndarray:
    """A keyed bijection of ``[0, 2**bits)``: rounds of adding a key, multiplying by an odd
    key and xor-shifting the high half down, each invertible modulo ``2**bits``."""
    mask = (np.uint64(1) << bits) - np.uint64(1)
    shift = (bits + np.uint64(1)) >> np.uint64(1)
    with np.errstate(over="ignore"):
        for add, mul in zip(adds, muls):
            x = ((x + add) * mul) & mask
            x ^= x >> shift
    return x


@dataclasses.dataclass(frozen=True)
class IndexBatch:
    """The frames of one batch.

    Attributes:
      number: the batch number.
      dataset_ids: int32 ``[B]``.
      rows: int64 ``[B]`` rows of the loader's concatenated step table.
      valid: bool ``[B]`` (False: padding of a validation pass).
      domain_ids: int32 ``[B]``.
      goal_uniform: float64 ``[B]`` draws for the goals, or None.
    """

    number: int
    dataset_ids: np.ndarray
    rows: np.ndarray
    valid: np.ndarray
    domain_ids: np.ndarray
    goal_uniform: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class TrainSampler:
    """Endless training batches: domains by weight, frames in a fresh permutation of each
    domain per epoch, this process's share only (see the module docstring).

    Attributes:
      weights: float64 ``[K]`` sampling probability of each domain.
      domain_frames: int64 ``[K]`` frames of each domain.
      frame_rows: int64 ``[F]`` table rows of the frames, grouped by domain.
      frame_datasets: int32 ``[F]`` their dataset ids, in the same order.
      batch_size: frames per batch.
      seed: the loader's seed.
      process_index: this process.
      process_count: the processes sharing the stream.
      goals: draw goal uniforms.
    """

    weights: np.ndarray
    domain_frames: np.ndarray
    frame_rows: np.ndarray
    frame_datasets: np.ndarray
    batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    goals: bool = False
    # Whole epoch permutations of small domains, computed once (a batch then looks them up):
    # (domain, epoch) -> permute(arange(n), n, ...). Only a cache: the draws are stateless.
    _epochs: dict[tuple[int, int], np.ndarray] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)

    def _domains(self, batches: np.ndarray) -> np.ndarray:
        """int32 ``[len(batches), B]``: the domain of every draw of these batches."""
        cdf = np.cumsum(self.weights)
        ids = np.searchsorted(cdf / cdf[-1], uniforms(self.seed, DOMAIN, batches,
                                                      self.batch_size), side="right")
        # Rounding can never pick a domain without weight: clamp to the last with some.
        return np.minimum(ids, np.flatnonzero(self.weights > 0)[-1]).astype(np.int32)

    def counters(self, batch: int) -> np.ndarray:
        """int64 ``[K]``: the draws of each domain in batches ``0 .. batch - 1``."""
        k = len(self.weights)
        total = np.zeros(k, np.int64)
        for lo in range(0, batch, _SKIP_CHUNK):
            ids = self._domains(np.arange(lo, min(batch, lo + _SKIP_CHUNK)))
            total += np.bincount(ids.ravel(), minlength=k)
        return total

    def batch(self, number: int, counters: np.ndarray) -> tuple[IndexBatch, np.ndarray]:
        """Batch ``number`` given the domain counters before it; returns it and the counters
        after it."""
        return self.block(number, 1, counters)

    def block(self, number: int, size: int, counters: np.ndarray
              ) -> tuple[IndexBatch, np.ndarray]:
        """Batches ``number .. number + size - 1`` given the domain counters before them, drawn
        at once and concatenated into one :class:`IndexBatch` of ``size * B`` frames (the
        batches one by one would give the same frames); returns it and the counters after
        it."""
        ids = self._domains(np.arange(number, number + size)).ravel()
        # Each draw's rank among the earlier draws of its domain in these batches.
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        group_start = np.searchsorted(sorted_ids, sorted_ids, side="left")
        before = np.empty_like(order)
        before[order] = np.arange(len(ids)) - group_start
        q = (counters[ids] + before) * self.process_count + self.process_index
        n = np.maximum(self.domain_frames, 1)[ids]
        perm = self._permuted(q % n, n, ids, q // n)
        where = self._domain_offsets[ids] + perm
        goal = (uniforms(self.seed, GOAL, np.arange(number, number + size),
                         self.batch_size).ravel() if self.goals else None)
        out = IndexBatch(number, self.frame_datasets[where], self.frame_rows[where],
                         np.ones(len(ids), bool), ids, goal)
        return out, counters + np.bincount(ids, minlength=len(self.weights))

    @property
    def _domain_offsets(self) -> np.ndarray:
        """int64 ``[K]``: where each domain's frames start in ``frame_rows``."""
        return np.concatenate([[0], np.cumsum(self.domain_frames)[:-1]]).astype(np.int64)

    def _permuted(self, position: np.ndarray, size: np.ndarray, domain: np.ndarray,
                  epoch: np.ndarray) -> np.ndarray:
        """``permute(position, size, stream=domain, epoch=epoch)``, through whole cached epochs
        for domains of up to ``_CACHED_EPOCH`` frames."""
        if size.max() > _CACHED_EPOCH:
            return permute(position, size, seed=self.seed, stream=domain, epoch=epoch)
        out = np.empty_like(position)
        pairs = domain.astype(np.int64) * (1 << 40) + epoch
        for pair in np.unique(pairs):
            where = pairs == pair
            d, e = divmod(int(pair), 1 << 40)
            perm = self._epochs.get((d, e))
            if perm is None:
                if len(self._epochs) >= 2 * len(self.weights):
                    del self._epochs[next(iter(self._epochs))]  # the oldest
                n = int(size[where][0])
                perm = permute(np.arange(n), n, seed=self.seed, stream=d, epoch=e)
                self._epochs[(d, e)] = perm
            out[where] = perm[position[where]]
        return out

    def iterate(self, start: int = 0, size: int = 1) -> Iterator[IndexBatch]:
        """Batches ``start, start + 1, ...`` (forever); with ``size > 1``, blocks of ``size``
        consecutive batches, each one concatenated :class:`IndexBatch` (see :meth:`block`)."""
        counters = self.counters(start)
        number = start
        while True:
            out, counters = self.block(number, size, counters)
            yield out
            number += size
