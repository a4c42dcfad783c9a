"""Windowed extraction: a long sequence cut into fixed windows that are encoded independently.

The masked acoustic models (frames, ``chunk_seconds``) and token BERT (tokens past
``max_positions``) read long inputs this way. Windows start at multiples of ``size`` from each
row's start, so a padded row is cut exactly as it would be alone, and "padded batch == one at
a time" holds for windowed extraction too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_windows(x: torch.Tensor, lengths: torch.Tensor, size: int, pad_value: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every row of ``x`` into ``n = ceil(T / size)`` windows of ``size`` steps.

    Args:
        x: (B, T, ...) padded sequences.
        lengths: (B,) valid steps per row.
        size: steps per window.
        pad_value: fills the last window of each row past ``T``.

    Returns:
        ``(windows, window_lengths)``: (B * n, size, ...) with row ``b``'s windows at
        ``b * n ... b * n + n - 1``, and (B * n,) valid steps of each (0 for a window wholly
        in the padding).
    """
    B, T = x.shape[:2]
    n = math.ceil(T / size)
    pad = (0, 0) * (x.dim() - 2) + (0, n * size - T)
    windows = F.pad(x, pad, value=pad_value).reshape(B * n, size, *x.shape[2:])  # (B*n, size, ...)
    starts = torch.arange(n, device=x.device) * size  # (n,)
    window_lengths = (lengths[:, None] - starts[None, :]).clamp(0, size).reshape(B * n)  # (B*n,)
    return windows, window_lengths


def from_windows(windows: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B * n, size, ...) -> (B, frames, ...)."""
    n_steps = windows.shape[0] // batch * windows.shape[1]
    return windows.reshape(batch, n_steps, *windows.shape[2:])[:, :frames]
