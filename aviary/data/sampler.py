"""Batches by total duration, not by count: similar lengths together, seeded, sharded, resumable.

Counting utterances per batch makes memory depend on which utterances happen to meet (one of
the complaints about s3prl, REFERENCE.md section 6). Here a batch holds as many utterances as
fit in ``max_seconds`` of *padded* audio: ``len(batch) * longest <= max_seconds``, which
bounds both the real audio and the padded tensor the model sees.

One epoch's batches are a pure function of ``(seed, epoch, durations)``:

1. every utterance gets a random key; indices are sorted by (length bucket, key), so lengths
   within a bucket of ``bucket_width`` seconds are mixed but buckets stay apart (little padding);
2. batches are filled greedily in that order;
3. the batch order is shuffled (so an epoch does not run from short to long).

Distributed training: every rank computes the same list and takes ``batches[rank::num_replicas]``.
Ranks must run the same number of steps, so an uneven tail is either dropped
(``drop_last=True``) or padded with the epoch's first batches (``drop_last=False``, the
default, which repeats at most ``num_replicas - 1`` batches). With one replica nothing is
dropped or repeated: every index appears exactly once per epoch.

A single utterance longer than ``max_seconds`` gets a batch of its own (the dataset's crop
decides how much of it is read); it is never silently dropped.

Resuming: ``set_epoch(epoch, start_batch=k)`` skips the first ``k`` batches this rank would
yield, so a run restarted mid-epoch sees exactly the batches it had not seen.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters), e.g. ``mix_seed(seed, g)``.

    The one seed mixer of aviary: the pretraining stream (``train/``), token crops and
    token batches (``data/tokens.py``) all draw their seeds from it.
    """
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    # The first 64-bit word of the state (generate_state(1) and (2) agree on it).
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def padded_batches(order: Iterable[int], sizes: Sequence[float], max_padded: float) -> list[list[int]]:
    """Fill batches greedily in ``order`` while the padded size ``len(batch) * longest`` fits.

    The one padded-size batcher: seconds of audio (this sampler, the feature cache, the
    tokenizer) or tokens (token corpora). An item larger than ``max_padded`` gets a batch of
    its own, never dropped. Sorting ``order`` by size keeps the padding small.

    Args:
        order: item indices in the order they are taken.
        sizes: size per index (seconds, tokens).
        max_padded: bound on ``len(batch) * max(sizes of the batch)``.

    Returns:
        Batches of indices, in fill order.
    """
    if not max_padded > 0:
        raise ValueError(f"max_padded must be > 0, got {max_padded!r}")
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        size = sizes[i]
        if cur and max(longest, size) * (len(cur) + 1) > max_padded:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, size)
    if cur:
        batches.append(cur)
    return batches


class DurationBatchSampler:
    """Duration-bounded, length-bucketed, seeded batch sampler (use as ``batch_sampler=``).

    Args:
        durations: seconds per dataset index (after any cropping the dataset applies).
        max_seconds: padded seconds per batch (``len(batch) * longest``).
        shuffle: randomise order (``False``: bucketed by length, ascending, deterministic).
        seed: base seed; epoch ``e`` uses ``(seed, e)``.
        bucket_width: seconds per length bucket.
        drop_last: with several replicas, drop the uneven tail instead of padding it.
        num_replicas: number of data-parallel ranks.
        rank: this process's rank.
        max_batch_seconds: alias of ``max_seconds``.
    """

    def __init__(self, durations: Sequence[float], max_seconds: float | None = None,
                 shuffle: bool = True, seed: int = 0, bucket_width: float = 1.0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 max_batch_seconds: float | None = None) -> None:
        if max_seconds is None:
            max_seconds = max_batch_seconds
        if max_seconds is None or not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} / num_replicas {num_replicas} is invalid")
        if bucket_width <= 0:
            raise ValueError(f"bucket_width must be > 0, got {bucket_width}")
        d = np.asarray(durations, dtype=np.float64)
        if d.ndim != 1 or not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError("durations must be finite, non-negative seconds (1-D)")
        self.durations = d
        self.max_seconds = float(max_seconds)
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_width = bucket_width
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its seed) and how many of this rank's batches to skip."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of the epoch, before sharding across ranks."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return [b[:] for b in self._cache[1]]
        d = self.durations
        n = len(d)
        if n == 0:
            return []
        rng = np.random.default_rng([self.seed, epoch])
        key = rng.random(n) if self.shuffle else np.arange(n, dtype=np.float64)
        bucket = np.floor(d / self.bucket_width)
        # lexsort: last key is primary -> sort by bucket, then by random key within a bucket.
        order = np.lexsort((key, bucket))
        batches = padded_batches(order.tolist(), d.tolist(), self.max_seconds)
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[j] for j in perm]
        self._cache = (epoch, [b[:] for b in batches])
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of the epoch (all of them, ignoring ``start_batch``)."""
        batches = self.global_batches(epoch)
        r = self.num_replicas
        if r > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) // r * r]
            else:
                pad = math.ceil(len(batches) / r) * r - len(batches)
                batches = batches + [batches[j % len(batches)] for j in range(pad)]
        return batches[self.rank::r]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()[self.start_batch:]

    def __len__(self) -> int:
        return max(len(self.rank_batches()) - self.start_batch, 0)
