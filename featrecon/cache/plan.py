"""Which sample goes to which batch slot in an epoch: a pure function of (seed, epoch, the
samples asked for, the world), computed before anything is read, so a rerun, a resumed run
and every rank of a data-parallel job see the same batches.

The samples are grouped into `Block`s, one per shard. Two shuffles:
- "global": one permutation of all the samples, cut into batches: every batch is drawn from
  the whole set (the loader reads each sample's own chunk, through its shard's index);
- "window": the blocks are read in a shuffled order and, `window` blocks at a time, their
  samples are permuted together: each shard is read whole, once, but a batch holds samples
  of about `window` shards (for object stores, where every read is a round trip).
Every requested sample comes out exactly once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Block:
    """The requested samples of one shard."""

    k: int  # shard index
    start: int  # the shard's first sample
    rows: np.ndarray  # positions inside the shard, sorted


def blocks(indices: np.ndarray, shard_size: int) -> list[Block]:
    """The sorted sample `indices` grouped by shard."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    shard_of = indices // shard_size
    return [Block(int(k), int(k) * shard_size, indices[shard_of == k] - int(k) * shard_size) for k in np.unique(shard_of)]


SHUFFLES = ("global", "window")


def epoch_plan(sizes: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True, window: int = 4,
               rank: int = 0, world: int = 1, mode: str = "window") -> tuple[list[int], np.ndarray]:
    """(block order, sequence) of one epoch over blocks of `sizes` samples: the blocks in reading
    order and, for every sample of the epoch in batch order, (position in the block order, row of
    that block's rows), as (n, 2) int64.

    Data parallel: each global batch of batch_size * world samples is cut into `world` parts and
    `rank` gets its part; the sequence is cut to whole global batches, so every rank runs the same
    number of steps (a rank with one step more would wait for the others' gradients forever)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}")
    if mode not in SHUFFLES:
        raise ValueError(f"shuffle mode {mode!r}: choose one of {', '.join(SHUFFLES)}")
    rng = np.random.default_rng([seed, epoch])
    if mode == "global" or not shuffle:  # blocks in stored order; the samples permuted all together
        order = list(range(len(sizes)))
        pos = _pairs(sizes, order, 0, len(order))
        seq = pos[rng.permutation(len(pos))] if shuffle else pos
        return order, _rank_part(seq, batch_size, rank, world)
    order = rng.permutation(len(sizes)).tolist()
    parts = []
    for w in range(0, len(order), max(1, window)):
        pos = _pairs(sizes, order, w, min(len(order), w + max(1, window)))
        parts.append(pos[rng.permutation(len(pos))])
    seq = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return order, _rank_part(seq, batch_size, rank, world)


def _pairs(sizes: list[int], order: list[int], lo: int, hi: int) -> np.ndarray:
    """(position in `order`, row) of every sample of the blocks at positions lo..hi-1 of `order`."""
    if hi <= lo:
        return np.zeros((0, 2), np.int64)
    return np.concatenate([np.stack([np.full(sizes[order[p]], p), np.arange(sizes[order[p]])], 1)
                           for p in range(lo, hi)]).astype(np.int64)


def _rank_part(seq: np.ndarray, batch_size: int, rank: int, world: int) -> np.ndarray:
    """This rank's part of each whole global batch (all of it without data parallelism)."""
    if world == 1:
        return seq
    g = batch_size * world
    steps = len(seq) // g
    return seq[: steps * g].reshape(steps, world, batch_size, 2)[:, rank].reshape(-1, 2)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Batches per epoch and rank: whole global batches only under data parallelism."""
    return n // (batch_size * world) if world > 1 else (n + batch_size - 1) // batch_size
