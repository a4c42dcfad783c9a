"""Accuracy with an interval: percentile bootstrap over utterances.

Frames of one utterance are not independent samples (neighbouring frames share a phone, an
utterance shares a speaker and a recording), so the interval of a frame-level accuracy
resamples whole utterances: each bootstrap replicate draws the test utterances with
replacement and recomputes ``sum(correct) / sum(frames)`` over the drawn ones. For
utterance-level tasks every utterance is one example and this is the ordinary bootstrap.
"""
from __future__ import annotations

import numpy as np

DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95


def bootstrap_interval(correct: np.ndarray, total: np.ndarray, *, replicates: int = DEFAULT_BOOTSTRAP,
                       level: float = DEFAULT_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(correct) / sum(total)`` resampling groups.

    Args:
        correct: ``(U,)`` correct predictions per utterance.
        total: ``(U,)`` scored examples per utterance (utterances with 0 are dropped).
        replicates: bootstrap replicates.
        level: coverage, e.g. 0.95.
        seed: the resampling seed (the same inputs and seed give the same interval).

    Returns:
        ``(low, high)`` accuracies in [0, 1]; ``(nan, nan)`` without any scored example.
    """
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    if correct.shape != total.shape or correct.ndim != 1:
        raise ValueError(f"correct {correct.shape} and total {total.shape} must be equal 1-d shapes")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level} must lie in (0, 1)")
    keep = total > 0
    correct, total = correct[keep], total[keep]
    if len(total) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, 0x5EED])
    idx = rng.integers(0, len(total), size=(replicates, len(total)))  # (B, U)
    acc = correct[idx].sum(1) / total[idx].sum(1)  # every replicate has U >= 1 groups of > 0 frames
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(acc, [a, 1.0 - a])
    return float(lo), float(hi)


def group_counts(correct: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of a per-example correctness vector: ``(correct per group, examples per group)``."""
    groups = np.asarray(groups, dtype=np.int64)
    c = np.bincount(groups, weights=np.asarray(correct, dtype=np.float64), minlength=num_groups)
    t = np.bincount(groups, minlength=num_groups).astype(np.float64)
    return c, t
