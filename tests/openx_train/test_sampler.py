"""The numpy index sampler: permutations, counter-based draws, resuming and process shares."""

from __future__ import annotations

import numpy as np
import pytest

from openx_train.data import sampler


def test_permute_is_a_fresh_permutation_per_epoch_and_stream():
    for n in (1, 2, 3, 7, 100, 1000, 4097):
        pos = np.arange(n, dtype=np.int64)
        perms = [sampler.permute(pos, n, seed=3, stream=1, epoch=e) for e in range(3)]
        for p in perms:
            np.testing.assert_array_equal(np.sort(p), pos)
        if n >= 7:
            assert not np.array_equal(perms[0], perms[1])
            other = sampler.permute(pos, n, seed=3, stream=2, epoch=0)
            assert not np.array_equal(perms[0], other)
            assert not np.array_equal(perms[0], sampler.permute(pos, n, seed=4, stream=1,
                                                                epoch=0))
    # Consecutive positions land far apart (a uniform permutation: about n / 3).
    p = sampler.permute(np.arange(300), 300, seed=0, stream=0, epoch=0)
    assert np.abs(np.diff(p)).mean() > 60


def test_permute_elementwise_with_mixed_sizes_and_streams():
    sizes = np.array([5, 5, 9, 9, 9])
    streams = np.array([0, 0, 1, 1, 1])
    got = sampler.permute(np.array([0, 4, 0, 3, 8]), sizes, seed=1, stream=streams, epoch=2)
    full5 = sampler.permute(np.arange(5), 5, seed=1, stream=0, epoch=2)
    full9 = sampler.permute(np.arange(9), 9, seed=1, stream=1, epoch=2)
    np.testing.assert_array_equal(got, [full5[0], full5[4], full9[0], full9[3], full9[8]])
    with pytest.raises(ValueError, match=r"positions must be in \[0, size\)"):
        sampler.permute(np.array([5]), 5, seed=0, stream=0, epoch=0)


def test_uniforms_depend_only_on_seed_stream_and_batch():
    a = sampler.uniforms(0, sampler.GOAL, np.arange(10), 64)
    assert a.shape == (10, 64) and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(a[7], sampler.uniforms(0, sampler.GOAL, 7, 64))
    assert not np.array_equal(a[0], sampler.uniforms(1, sampler.GOAL, 0, 64))
    assert not np.array_equal(a[0], sampler.uniforms(0, sampler.DOMAIN, 0, 64))
    assert abs(a.mean() - 0.5) < 0.03


def _sampler(**kw) -> sampler.TrainSampler:
    counts = np.array([50, 0, 30, 7])
    options = dict(weights=np.array([0.5, 0.0, 0.3, 0.2]), domain_frames=counts,
                   frame_rows=np.arange(counts.sum()) * 10,
                   frame_datasets=np.repeat(np.arange(4, dtype=np.int32), counts),
                   batch_size=16, seed=5, goals=True)
    options.update(kw)
    return sampler.TrainSampler(**options)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_a_resumed_sampler_gives_the_uninterrupted_batches():
    s = _sampler()
    full = _take(s.iterate(0), 40)
    resumed = _take(s.iterate(23), 17)
    for a, b in zip(full[23:], resumed):
        assert a.number == b.number
        for f in ("dataset_ids", "rows", "valid", "domain_ids", "goal_uniform"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    counters = s.counters(40)
    assert counters.sum() == 40 * 16 and counters[1] == 0
    np.testing.assert_array_equal(
        counters, np.bincount(np.concatenate([b.domain_ids for b in full]), minlength=4))


def test_each_domain_epoch_visits_every_frame_once():
    s = _sampler(weights=np.array([0.0, 0.0, 0.0, 1.0]))
    rows = np.concatenate([b.rows for b in _take(s.iterate(0), 7)])  # 112 draws: 16 epochs
    epochs = rows[: 7 * 16].reshape(16, 7)
    want = np.arange(80, 87) * 10
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), want)
    assert len({tuple(e) for e in epochs}) > 1


def test_process_shares_are_disjoint_and_cover_the_epoch():
    shares = [_sampler(weights=np.array([1.0, 0, 0, 0]), process_index=i, process_count=3)
              for i in range(3)]
    # 50 frames; 3 processes x 16 draws = 48 positions of epoch 0 per batch
    first = [next(s.iterate(0)).rows for s in shares]
    seen = np.concatenate(first)
    assert len(set(seen.tolist())) == len(seen) == 48
    for s, rows in zip(shares, first):
        np.testing.assert_array_equal(next(s.iterate(0)).rows, rows)  # deterministic


def test_cached_epochs_give_the_elementwise_permutation(monkeypatch):
    cached = _take(_sampler().iterate(0), 30)
    monkeypatch.setattr(sampler, "_CACHED_EPOCH", 0)  # every domain permuted elementwise
    direct = _take(_sampler().iterate(0), 30)
    for a, b in zip(cached, direct):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.dataset_ids, b.dataset_ids)


def _reference_rows(s: sampler.TrainSampler, batches: int) -> np.ndarray:
    """The sampler's definition, one draw at a time: each draw takes the next position of its
    domain's stream (this process's share), through that domain's epoch permutation."""
    counters = np.zeros(len(s.weights), np.int64)
    offsets = np.concatenate([[0], np.cumsum(s.domain_frames)[:-1]])
    rows = []
    for b in range(batches):
        for d in s._domains(np.array([b]))[0]:
            q = counters[d] * s.process_count + s.process_index
            n = s.domain_frames[d]
            p = sampler.permute(q % n, n, seed=s.seed, stream=d, epoch=q // n)
            rows.append(s.frame_rows[offsets[d] + p])
            counters[d] += 1
    return np.array(rows)


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("share", [(0, 1), (1, 3)])
def test_blocks_draw_the_frames_of_the_batches_one_by_one(size, share):
    s = _sampler(process_index=share[0], process_count=share[1])
    want = _reference_rows(s, 24)  # several epochs of every domain
    it = s.iterate(0, size)
    blocks = _take(it, 24 // size)
    assert [b.number for b in blocks] == list(range(0, 24, size))
    np.testing.assert_array_equal(np.concatenate([b.rows for b in blocks]), want)
    single = _take(s.iterate(0), 24)
    for f in ("dataset_ids", "rows", "valid", "domain_ids", "goal_uniform"):
        np.testing.assert_array_equal(np.concatenate([getattr(b, f) for b in blocks]),
                                      np.concatenate([getattr(b, f) for b in single]))
    resumed = next(s.iterate(size * 2, size))  # a block resumed mid-stream
    np.testing.assert_array_equal(resumed.rows, blocks[2].rows)
