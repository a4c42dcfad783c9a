"""Sequences travel with their lengths: the one place that turns lengths into masks.

Every padded batch in aviary is a tensor (B, T, ...) plus (B,) valid positions per row;
frontends, encoders, objectives, probes and analyses all derive their masks here.
"""
from __future__ import annotations

import torch


def valid_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, ``True`` at valid positions (``t < lengths[b]``).

    Args:
        lengths: (B,) number of valid positions per row.
        T: padded length.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be (B,), got shape {tuple(lengths.shape)}")
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, ``True`` at padding (``t >= lengths[b]``): the
    key-padding mask attention layers take. The complement of :func:`valid_mask`."""
    return ~valid_mask(lengths, T)
