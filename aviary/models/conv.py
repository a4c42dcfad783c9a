"""Convolution stacks of wav2vec / vq-wav2vec (Schneider et al. 2019, Baevski et al. 2020).

:class:`ConvFeatureEncoder` turns a waveform into frames (8 convs, stride 160 = 10 ms);
:class:`ConvAggregator` is the causal context network. Padding: GroupNorm with one group
normalises over channels *and time*, so padded frames would change the statistics of real
ones. :class:`MaskedGroupNorm` takes its statistics over valid frames only, which makes a
padded batch give the same result as one utterance at a time. Convolutions need no
masking: a valid output frame of a (causal) conv only reads valid input samples.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.lengths import valid_mask


class MaskedGroupNorm(nn.Module):
    """GroupNorm over (channels of a group, valid time steps) with an affine transform.

    Equals ``nn.GroupNorm`` when every frame is valid; with a mask, padding neither enters
    the statistics nor keeps its values (it is zeroed). Statistics in float32 (fairseq's
    Fp32GroupNorm does the same for fp16 safety).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} not divisible by num_groups {num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T), mask (B, T) bool True = valid (or None) -> (B, C, T)."""
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
        # F.group_norm refuses groups of one value in training (a per-channel norm of a
        # 1-frame input); the masked path gives the same result (zero variance) there.
        if bool(mask.all()) and x.shape[-1] * (x.shape[1] // self.num_groups) > 1:
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        b, c, t = x.shape
        g = self.num_groups
        xf = x.float()
        m = mask.to(xf.dtype).unsqueeze(-1)  # (B, T, 1)
        # Masked sums over time as batched matmuls (one pass each, no (B, C, T) temporaries
        # beyond x^2): these early layers run at 3.2 kHz, so elementwise passes dominate.
        s1 = torch.bmm(xf, m).view(b, g, c // g).sum(-1)  # (B, G)
        s2 = torch.bmm(xf * xf, m).view(b, g, c // g).sum(-1)
        n = (m.sum((1, 2)) * (c // g)).clamp(min=1.0).unsqueeze(-1)  # (B, 1)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp(min=0.0)  # E[x^2] - E[x]^2, in float32
        rstd = torch.rsqrt(var + self.eps)
        # y = (x - mean) * rstd * w + b = x * scale + shift, per (row, channel).
        scale = rstd.repeat_interleave(c // g, dim=1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(c // g, dim=1) * scale
        y = torch.addcmul(shift.unsqueeze(-1), xf, scale.unsqueeze(-1))
        return (y * mask.unsqueeze(1).to(y.dtype)).to(x.dtype)


def conv_output_lengths(lengths: torch.Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Valid output frames of a stack of unpadded convolutions: ``floor((L - k) / s) + 1`` per layer."""
    out = lengths.clone()
    for k, s in zip(kernels, strides):
        out = torch.div(out - k, s, rounding_mode="floor") + 1
        out = out.clamp(min=0)
    return out


class ConvFeatureEncoder(nn.Module):
    """Waveform encoder: per layer conv (no bias) -> dropout -> GroupNorm(1 group) -> ReLU.

    Args:
        channels: output channels of every layer.
        kernels, strides: per-layer kernel sizes and strides.
        dropout: dropout probability after each conv.
        log_compression: apply ``log(|x| + 1)`` to the output (paper).
    """

    def __init__(self, channels: int, kernels: tuple[int, ...], strides: tuple[int, ...],
                 dropout: float = 0.0, log_compression: bool = True):
        super().__init__()
        self.kernels, self.strides = tuple(kernels), tuple(strides)
        self.convs = nn.ModuleList(
            nn.Conv1d(1 if i == 0 else channels, channels, k, stride=s, bias=False)
            for i, (k, s) in enumerate(zip(kernels, strides)))
        self.norms = nn.ModuleList(MaskedGroupNorm(1, channels) for _ in kernels)
        self.dropout = nn.Dropout(dropout)
        self.log_compression = log_compression
        self.receptive_field = 1 + sum((k - 1) * math.prod(self.strides[:i]) for i, k in enumerate(self.kernels))

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wavs (B, N), lengths (B,) samples -> (features (B, C, T), frames (B,))."""
        if wavs.shape[1] < self.receptive_field:
            # Too short for even one frame: pad so the convolutions run; lengths stay 0.
            wavs = F.pad(wavs, (0, self.receptive_field - wavs.shape[1]))
        x = wavs.unsqueeze(1)  # (B, 1, N)
        lens = lengths
        for conv, norm, k, s in zip(self.convs, self.norms, self.kernels, self.strides):
            x = conv(x)  # (B, C, T_l)
            lens = (torch.div(lens - k, s, rounding_mode="floor") + 1).clamp(min=0)
            x = self.dropout(x)
            x = F.relu(norm(x, valid_mask(lens, x.shape[-1])))
        if self.log_compression:
            x = torch.log(x.abs() + 1.0)
        return x, lens


class ConvAggregator(nn.Module):
    """Causal context network: per layer left-padded conv -> dropout -> GroupNorm(1) -> ReLU,
    then ``x = (x + residual) * residual_scale``.

    Frame t sees only quantised frames <= t, so predicting t+k is not trivial.
    """

    def __init__(self, channels: int, kernels: tuple[int, ...], dropout: float = 0.0,
                 residual_scale: float = math.sqrt(0.5)):
        super().__init__()
        self.kernels = tuple(kernels)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, k) for k in kernels)
        self.norms = nn.ModuleList(MaskedGroupNorm(1, channels) for _ in kernels)
        self.dropout = nn.Dropout(dropout)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                max_layer: int | None = None) -> list[torch.Tensor]:
        """x (B, C, T) -> every layer's output, a list of (B, C, T)."""
        outs = []
        n = len(self.convs) if max_layer is None else min(max_layer, len(self.convs))
        for conv, norm, k in list(zip(self.convs, self.norms, self.kernels))[:n]:
            res = x
            x = conv(F.pad(x, (k - 1, 0)))  # causal: left padding only
            x = F.relu(norm(self.dropout(x), valid))
            x = (x + res) * self.residual_scale
            outs.append(x)
        return outs
