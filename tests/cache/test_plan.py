"""The epoch plan alone: a pure function of (seed, epoch, the samples, the world)."""

from __future__ import annotations

import numpy as np
import pytest

from featrecon.cache.plan import blocks, epoch_plan, steps_per_epoch


def samples_of(sizes, order, seq):
    """The (block, row) pairs the plan's sequence names, as (block index, row)."""
    return [(order[p], r) for p, r in seq.tolist()]


def test_blocks_group_sorted_samples_by_shard():
    got = blocks(np.array([9, 1, 2, 8, 12]), shard_size=4)
    assert [(b.k, b.start, b.rows.tolist()) for b in got] == [(0, 0, [1, 2]), (2, 8, [0, 1]), (3, 12, [0])]


@pytest.mark.parametrize("window", [1, 3, 100])
def test_every_sample_once_fixed_by_seed_and_epoch(window):
    sizes = [4, 4, 3, 1, 4, 2]
    order, seq = epoch_plan(sizes, batch_size=5, seed=3, epoch=0, window=window)
    assert sorted(samples_of(sizes, order, seq)) == [(b, r) for b, n in enumerate(sizes) for r in range(n)]
    again = epoch_plan(sizes, batch_size=5, seed=3, epoch=0, window=window)
    assert again[0] == order and np.array_equal(again[1], seq)  # deterministic
    other = epoch_plan(sizes, batch_size=5, seed=3, epoch=1, window=window)
    assert samples_of(sizes, *other) != samples_of(sizes, order, seq)  # another epoch, another order


def test_without_shuffle_the_plan_is_the_stored_order():
    order, seq = epoch_plan([2, 3], batch_size=2, seed=0, epoch=5, shuffle=False)
    assert order == [0, 1] and seq.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]


def test_ranks_get_disjoint_parts_of_whole_global_batches():
    sizes = [4] * 7 + [3]  # 31 samples
    single = epoch_plan(sizes, batch_size=3, seed=1, epoch=2)
    parts = [epoch_plan(sizes, batch_size=3, seed=1, epoch=2, rank=r, world=2) for r in range(2)]
    assert all(p[0] == single[0] for p in parts)  # the same reading order on every rank
    assert all(len(p[1]) == 15 for p in parts)  # 31 // 6 = 5 global batches of 3 + 3
    steps = single[1][:30].reshape(5, 2, 3, 2)
    for r, (_, seq) in enumerate(parts):
        np.testing.assert_array_equal(seq.reshape(5, 3, 2), steps[:, r])  # each global batch cut in rank order
    both = [tuple(x) for p in parts for x in p[1].tolist()]
    assert len(set(both)) == 30  # disjoint, and only the last incomplete global batch is left out
    assert steps_per_epoch(31, 3, world=2) == 5 and steps_per_epoch(31, 3) == 11
    with pytest.raises(ValueError, match="rank 2 of a world of 2"):
        epoch_plan(sizes, 3, 0, 0, rank=2, world=2)


def distinct_shards(order, seq, batch_size):
    blocks_of = np.array(order)[seq[:, 0]]
    return np.mean([len(set(blocks_of[i: i + batch_size].tolist())) for i in range(0, len(seq), batch_size)])


def test_a_global_shuffle_draws_batches_from_the_whole_set_like_a_uniform_one():
    """Distinct shards per batch, against the expectation for a uniform draw without replacement
    (a shard of m of the N samples is missed by a batch of B with probability C(N-m, B) / C(N, B))."""
    from math import comb

    sizes, batch = [32] * 75, 64
    n = sum(sizes)
    uniform = len(sizes) * (1 - comb(n - 32, batch) / comb(n, batch))
    glob = np.mean([distinct_shards(*epoch_plan(sizes, batch, 0, e, mode="global"), batch) for e in range(3)])
    window = np.mean([distinct_shards(*epoch_plan(sizes, batch, 0, e, window=4), batch) for e in range(3)])
    assert glob >= 0.97 * uniform and window <= 4.5 < 0.2 * uniform
    order, seq = epoch_plan(sizes, batch, 5, 1, mode="global")
    assert sorted(map(tuple, seq.tolist())) == [(b, r) for b in range(75) for r in range(32)]
