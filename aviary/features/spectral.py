"""Batched, length-aware spectral primitives: framing, STFT power, mel banks, deltas.

Every function takes a padded batch and per-row lengths and gives, for each row, exactly
what it would give for that row alone: reflect padding (``center=True``) reflects at the
row's own end, deltas replicate the row's own last frame, statistics skip padding.
This is what makes "padded batch == one utterance at a time" hold.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from aviary.lengths import padding_mask  # noqa: F401  (the front-ends use it as spectral.padding_mask)


def num_frames(num_samples: torch.Tensor | int, win_length: int, hop_length: int, center: bool,
               n_fft: int | None = None) -> torch.Tensor | int:
    """Frames produced from ``num_samples`` samples.

    ``center=True`` (librosa / torch.stft / s3prl): ``1 + N // hop`` (the signal is reflect-
    padded by ``n_fft // 2`` on both sides). ``center=False`` (Kaldi ``snip_edges``):
    ``1 + (N - win) // hop`` frames that lie wholly inside the signal, 0 if ``N < win``.
    """
    if center:
        return 1 + num_samples // hop_length
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= win_length, 1 + (num_samples - win_length) // hop_length,
                           torch.zeros_like(num_samples))
    return 1 + (num_samples - win_length) // hop_length if num_samples >= win_length else 0


def _reflect_index(pos: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Map positions (B, P) (may be < 0 or >= length) to reflect-padded source indices."""
    n = lengths.unsqueeze(1)  # (B, 1)
    idx = pos.abs()
    idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    # Rows shorter than the pad would need repeated reflection; clamp (torch.stft refuses them).
    return idx.clamp(min=0).minimum((n - 1).clamp(min=0))


def frame_signal(wavs: torch.Tensor, lengths: torch.Tensor, frame_length: int, hop_length: int,
                 center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut (B, N) waveforms into (B, T, frame_length) frames.

    Args:
        wavs: (B, N) padded waveforms.
        lengths: (B,) valid samples per row.
        frame_length: samples per frame (n_fft when centred, the window length otherwise).
        hop_length: hop in samples.
        center: reflect-pad ``frame_length // 2`` at each row's own start and end.

    Returns:
        frames (B, T, frame_length) and (B,) valid frames per row.
    """
    B, N = wavs.shape
    if center:
        pad = frame_length // 2
        T = 1 + N // hop_length
        P = (T - 1) * hop_length + frame_length
        pos = torch.arange(P, device=wavs.device).unsqueeze(0) - pad  # (1, P)
        idx = _reflect_index(pos.expand(B, P), lengths)
        padded = torch.gather(wavs, 1, idx)  # (B, P)
        out_len = 1 + lengths // hop_length
    else:
        if N < frame_length:
            wavs = torch.nn.functional.pad(wavs, (0, frame_length - N))
        padded = wavs
        out_len = num_frames(lengths, frame_length, hop_length, center=False)
    frames = padded.unfold(-1, frame_length, hop_length)  # (B, T, frame_length)
    return frames, out_len


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                   f_max: float | None = None, htk: bool = True, norm: str | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular mel filterbank from librosa.

    ``htk=True, norm=None`` equals torchaudio's ``MelScale`` defaults (what s3prl uses).
    Under ``torch.device("meta")`` (a model built for its shapes only, e.g. parameter counts
    in ``aviary models``) an empty tensor of the right shape: importing librosa alone takes
    over a second.
    """
    if torch.get_default_device().type == "meta":
        return torch.empty(n_fft // 2 + 1, n_mels)
    return _librosa_mel(sample_rate, n_fft, n_mels, f_min, f_max, htk, norm)


@lru_cache(maxsize=32)
def _librosa_mel(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float | None, htk: bool,
                 norm: str | None) -> torch.Tensor:
    import librosa  # deferred: heavy (scipy.signal, numba), needed only where a mel front-end is built

    fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max,
                             htk=htk, norm=norm, dtype=np.float32)
    return torch.from_numpy(fb.T.copy())


@lru_cache(maxsize=32)
def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> torch.Tensor:
    """(n_fft // 2 + 1, num_bins) Kaldi mel banks: triangles linear in the *mel* domain.

    Kaldi (and torchaudio.compliance.kaldi) builds each triangle from the mel value of every
    FFT bin, ``mel = 1127 ln(1 + f / 700)``, unlike librosa whose triangles are linear in Hz.
    The Nyquist bin gets zero weight, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    num_fft_bins = n_fft // 2
    fft_bin_width = sample_rate / n_fft

    def mel(f: np.ndarray | float) -> np.ndarray | float:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]
    left = mel_low + b * mel_delta
    center = mel_low + (b + 1.0) * mel_delta
    right = mel_low + (b + 2.0) * mel_delta
    m = mel(fft_bin_width * np.arange(num_fft_bins, dtype=np.float64))[None, :]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # (num_bins, num_fft_bins)
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Nyquist column
    return torch.from_numpy(banks.T.astype(np.float32).copy())


def deltas(feats: torch.Tensor, lengths: torch.Tensor, win_length: int = 5) -> torch.Tensor:
    """Regression deltas along time (HTK / torchaudio ``compute_deltas`` formula).

    ``d_t = sum_{n=1}^{N} n (c_{t+n} - c_{t-n}) / (2 sum n^2)`` with each row's own first and
    last valid frames replicated as padding.

    Args:
        feats: (B, T, D).
        lengths: (B,) valid frames.
        win_length: odd window, 5 by default (N = 2).

    Returns:
        (B, T, D) deltas (padding frames are unspecified).
    """
    if win_length < 3 or win_length % 2 == 0:
        raise ValueError(f"delta win_length must be odd and >= 3, got {win_length}")
    B, T, D = feats.shape
    n = (win_length - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    t = torch.arange(T, device=feats.device).unsqueeze(0)  # (1, T)
    hi = (lengths - 1).clamp(min=0).unsqueeze(1)  # (B, 1)
    out = torch.zeros_like(feats)
    for k in range(1, n + 1):
        plus = torch.minimum((t + k).expand(B, T), hi).clamp(min=0)
        minus = (t - k).clamp(min=0).minimum(hi).expand(B, T)
        gp = torch.gather(feats, 1, plus.unsqueeze(-1).expand(B, T, D))
        gm = torch.gather(feats, 1, minus.unsqueeze(-1).expand(B, T, D))
        out = out + k * (gp - gm)
    return out / denom


def masked_mean_std(feats: torch.Tensor, lengths: torch.Tensor, unbiased: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and std over valid frames: (B, T, D) -> (B, 1, D) each."""
    valid = (~padding_mask(lengths, feats.shape[1])).unsqueeze(-1).to(feats.dtype)  # (B, T, 1)
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (feats * valid).sum(1, keepdim=True) / count
    var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / (count - 1 if unbiased else count).clamp(min=1)
    return mean, var.sqrt()


def hann_window(length: int, periodic: bool = True) -> torch.Tensor:
    """torch's Hann window, computed on the CPU whatever the default device: under
    ``torch.device("meta")`` torch decomposes it, and that first call costs ~2 s."""
    return torch.hann_window(length, periodic=periodic, device="cpu")


def kaldi_hanning(length: int) -> torch.Tensor:
    """Kaldi's "hanning" window: symmetric, ``0.5 - 0.5 cos(2 pi n / (N - 1))``."""
    n = torch.arange(length, dtype=torch.float64, device="cpu")  # on the CPU: see hann_window
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).float()


def kaldi_povey(length: int) -> torch.Tensor:
    """Kaldi's default "povey" window: hanning to the power 0.85."""
    return kaldi_hanning(length).pow(0.85)
