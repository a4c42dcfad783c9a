"""Do a layer's features still vary from frame to frame? (a representation-collapse check)

A masked acoustic model that has not yet left the "predict the average spectrum" plateau
of early pretraining can make its upper layers output nearly the same vector at every
frame: attention averages the whole utterance and nothing frame-specific survives. Linear
probes on such layers sit at the majority class. This module measures, per layer,

    spread = mean_d std_t(h[t, d]) / sqrt(mean_{t,d} h[t, d]^2)

over frames t of a sample of utterances (features of different utterances pooled): about
1 for features that vary as much as their magnitude, near 0 for collapsed ones.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from aviary.evaluate.cache import FeatureCache

#: Spread below this is reported as collapsed (a healthy layer is > 0.3; the plateau < 0.01).
COLLAPSE_THRESHOLD = 0.05


def frame_spread(frames: np.ndarray) -> float:
    """Spread of one layer's frames ``(N, H)`` (see the module docstring)."""
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need frames (N >= 2, H), got shape {x.shape}")
    rms = float(np.sqrt(np.mean(x ** 2)))
    return float(x.std(axis=0).mean() / rms) if rms > 0 else 0.0


def cache_spread(cache_path: str, max_utterances: int = 50) -> list[float]:
    """Spread of every cached layer over the first ``max_utterances`` utterances of a feature cache.

    Returns:
        One value per cached layer, in the cache's layer order.
    """
    cache = FeatureCache(cache_path)
    ids = cache.ids[:max_utterances]
    return [frame_spread(np.concatenate([cache.get(i, k) for i in ids])) for k in cache.layers]


def collapsed_layers(spread: Sequence[float], threshold: float = COLLAPSE_THRESHOLD) -> list[int]:
    """Indices of layers whose spread is below ``threshold``."""
    return [k for k, s in enumerate(spread) if s < threshold]
