"""Front-ends: waveform batch -> feature batch, with lengths in and lengths out.

Three kinds, one small class each (:data:`FRONTEND_KINDS`), all batched on torch, all
exposing ``dim`` and ``frame_shift``:

* ``logmel``: s3prl's "online" Mockingjay / TERA / AALBERT input. Centred STFT (reflect
  padding), periodic Hann window of 400 samples, n_fft 400, hop 160, power spectrum,
  HTK mel filters without normalisation (torchaudio ``MelScale`` defaults), ``log(x + 1e-10)``,
  optional delta and delta-delta (window 5), optional CMVN.
* ``linear``: the same STFT, ``log(|X|^2 + 1e-10)`` over all ``n_fft // 2 + 1`` = 201 bins
  (Mockingjay LARGE / AALBERT reconstruction target).
* ``fbank``: Kaldi-style log-mel filterbank as SSAST computes it with
  ``torchaudio.compliance.kaldi.fbank(htk_compat=True, window_type="hanning", dither=0,
  num_mel_bins=128, frame_shift=10)``: waveform mean removed, 25 ms frames without
  centring (``snip_edges``), per-frame DC removal, pre-emphasis 0.97, symmetric Hanning
  window, zero-padded FFT of 512, power, Kaldi mel banks from 20 Hz, ``log(max(x, eps))``;
  then SSAST's ``(x - mean) / (2 * std)`` with corpus statistics.

CMVN: ``utterance`` (each utterance's own mean / unbiased std over its valid frames, as
s3prl) or ``global`` (corpus statistics stored in the config, computed once by
:func:`compute_global_stats`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch
import torch.nn as nn

from aviary.config import Config, check, check_range
from aviary.features import spectral

log = logging.getLogger(__name__)

# torch.finfo(float32).eps: the floor Kaldi applies before the log.
_KALDI_EPS = 1.1920928955078125e-07


@dataclass(frozen=True)
class FrontEndConfig(Config):
    """Configuration of a front-end. All lengths are in samples at ``sample_rate``."""

    kind: Literal["logmel", "linear", "fbank"] = "logmel"
    sample_rate: int = 16000
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    n_fft: int = 400  # logmel / linear; fbank rounds win_length up to a power of two (512)
    n_mels: int = 80  # logmel and fbank (SSAST uses 128)
    delta_order: int = 0  # 0: static only, 1: + delta, 2: + delta-delta
    cmvn: Literal["none", "utterance", "global"] = "none"
    cmvn_mean: tuple[float, ...] = ()  # global CMVN statistics, one per output dim
    cmvn_std: tuple[float, ...] = ()
    log_eps: float = 1e-10  # s3prl adds 1e-10 before the log
    normalize_db: Optional[float] = None  # scale each waveform to this RMS level (s3prl: -25)
    # fbank (SSAST) dataset normalisation: (x - mean) / (2 * std); AudioSet values by default.
    fbank_mean: float = -4.2677393
    fbank_std: float = 4.5689974
    fbank_normalize: bool = True

    def validate(self) -> None:
        check_range("sample_rate", self.sample_rate, 1000, 192000)
        check_range("win_length", self.win_length, 16, 1 << 16)
        check_range("hop_length", self.hop_length, 1, self.win_length)
        check(self.n_fft >= self.win_length, "n_fft", self.n_fft, f">= win_length ({self.win_length})")
        check_range("n_mels", self.n_mels, 1, 512)
        check_range("delta_order", self.delta_order, 0, 2)
        check_range("log_eps", self.log_eps, 0.0, 1.0, lo_open=True)
        check_range("fbank_std", self.fbank_std, 0.0, None, lo_open=True)
        if self.cmvn == "global":
            check(len(self.cmvn_mean) > 0 and len(self.cmvn_mean) == len(self.cmvn_std), "cmvn_mean",
                  f"{len(self.cmvn_mean)} values", "one mean and one std per feature dim (run compute_global_stats)")
            check(all(s > 0 for s in self.cmvn_std), "cmvn_std", "values <= 0", "positive stds")
        if self.normalize_db is not None:
            check_range("normalize_db", self.normalize_db, -100.0, 0.0)

    @property
    def frame_shift(self) -> float:
        """Seconds between frames."""
        return self.hop_length / self.sample_rate

    @property
    def static_dim(self) -> int:
        return FRONTEND_KINDS[self.kind].static_dim(self)

    @property
    def dim(self) -> int:
        return self.static_dim * (1 + self.delta_order)


class FrontEnd(nn.Module):
    """Waveforms (B, N) + lengths (B,) -> features (B, T, D) + lengths (B,).

    The steps every kind shares (checks, level normalisation, CMVN, zeroed padding) live
    here; a kind is a subclass giving its static bins, framing and raw features, found by
    ``config.kind`` in :data:`FRONTEND_KINDS` (use :func:`build_frontend`).

    Padding frames of the output are zero. Parameters: none (buffers only), so a front-end
    never changes in training and always rebuilds from its config.
    """

    #: Kaldi-style framing (``snip_edges``) instead of centred frames.
    centered: bool = True

    def __init__(self, config: FrontEndConfig):
        super().__init__()
        self.config = config
        if config.cmvn == "global":
            self.register_buffer("cmvn_mean", torch.tensor(config.cmvn_mean, dtype=torch.float32), persistent=False)
            self.register_buffer("cmvn_std", torch.tensor(config.cmvn_std, dtype=torch.float32), persistent=False)

    @staticmethod
    def static_dim(config: FrontEndConfig) -> int:
        """Feature dimension before deltas."""
        return config.n_mels

    @property
    def dim(self) -> int:
        """Output feature dimension."""
        return self.config.dim

    @property
    def frame_shift(self) -> float:
        """Seconds between output frames."""
        return self.config.frame_shift

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def num_frames(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Output frames for ``num_samples`` input samples."""
        c = self.config
        return spectral.num_frames(num_samples, c.win_length, c.hop_length, center=self.centered)

    def min_samples(self) -> int:
        """Shortest input giving at least one frame without degenerate padding."""
        raise NotImplementedError

    def raw_features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kind's features before CMVN: (B, N) level-normalised, zero-padded waveforms
        -> (B, T, dim), lengths (B,) in frames."""
        raise NotImplementedError

    @classmethod
    def measuring_config(cls, config: FrontEndConfig) -> FrontEndConfig:
        """The config whose features :func:`compute_global_stats` measures (no normalisation)."""
        return config.replace(cmvn="none", cmvn_mean=(), cmvn_std=())

    @classmethod
    def with_stats(cls, config: FrontEndConfig, s1: torch.Tensor, s2: torch.Tensor, total: int
                   ) -> FrontEndConfig:
        """``config`` normalised by per-dimension corpus statistics (global CMVN).

        Args:
            s1, s2: float64 (D,) sums of the values and of their squares over ``total`` frames.
        """
        mean = s1 / total
        std = ((s2 / total - mean ** 2).clamp(min=0) * total / (total - 1)).sqrt().clamp(min=1e-5)
        return config.replace(cmvn="global", cmvn_mean=tuple(float(v) for v in mean),
                              cmvn_std=tuple(float(v) for v in std))

    @torch.no_grad()
    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute features.

        Args:
            wavs: (B, N) float waveforms (or (N,)).
            lengths: (B,) valid samples per row; ``None`` = all full length.

        Returns:
            feats (B, T, dim) float32 with zeroed padding frames, and lengths (B,) in frames.
        """
        wavs, lengths = self._checked(wavs, lengths)
        valid = ~spectral.padding_mask(lengths, wavs.shape[1])  # (B, N)
        wavs = wavs * valid
        if self.config.normalize_db is not None:
            wavs = self._normalize_level(wavs, lengths)
        feats, out_len = self.raw_features(wavs, lengths)
        feats = self._cmvn(feats, out_len)
        pad = spectral.padding_mask(out_len, feats.shape[1]).unsqueeze(-1)
        return feats.masked_fill(pad, 0.0), out_len

    def _checked(self, wavs: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) float32 waveforms and (B,) long lengths, or a ValueError naming the problem."""
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        if wavs.dim() != 2:
            raise ValueError(f"front-end expects (B, N) waveforms, got shape {tuple(wavs.shape)}")
        wavs = wavs.float()
        B, N = wavs.shape
        if lengths is None:
            lengths = torch.full((B,), N, dtype=torch.long, device=wavs.device)
        lengths = lengths.to(device=wavs.device, dtype=torch.long)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B and int(lengths.max()) > N:
            raise ValueError(f"lengths max {int(lengths.max())} exceeds padded length {N}")
        short = lengths < self.min_samples()
        if bool(short.any()):
            i = int(short.nonzero()[0])
            raise ValueError(f"utterance {i} has {int(lengths[i])} samples; the {self.config.kind} front-end "
                             f"needs at least {self.min_samples()} ({self.min_samples() / self.sample_rate * 1000:.1f} ms)")
        return wavs, lengths

    def _normalize_level(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # s3prl: scalar = 10^(target/20) / (rms + 1e-10), rms over the utterance's samples.
        rms = (wavs.pow(2).sum(1) / lengths.clamp(min=1)).sqrt()
        scalar = (10 ** (self.config.normalize_db / 20)) / (rms + 1e-10)
        return wavs * scalar.unsqueeze(1)

    def _cmvn(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.cmvn == "utterance":
            mean, std = spectral.masked_mean_std(feats, lengths, unbiased=True)
            return (feats - mean) / (std + c.log_eps)
        if c.cmvn == "global":
            return (feats - self.cmvn_mean) / self.cmvn_std
        return feats


class _StftFrontEnd(FrontEnd):
    """Centred STFT power (s3prl's "online" features), then the kind's bins, log, deltas."""

    def __init__(self, config: FrontEndConfig):
        super().__init__(config)
        c = config
        self.fft_size = c.n_fft
        win = spectral.hann_window(c.win_length)
        # torch.stft centres a shorter window inside n_fft.
        left = (c.n_fft - c.win_length) // 2
        win = nn.functional.pad(win, (left, c.n_fft - c.win_length - left))
        self.register_buffer("window", win, persistent=False)

    def min_samples(self) -> int:
        return self.config.n_fft // 2 + 1

    def bins(self, power: torch.Tensor) -> torch.Tensor:
        """(B, T, n_fft//2+1) power spectrum -> (B, T, static_dim)."""
        return power

    def raw_features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        frames, out_len = spectral.frame_signal(wavs, lengths, c.n_fft, c.hop_length, center=True)
        power = torch.fft.rfft(frames * self.window, dim=-1).abs().pow(2)  # (B, T, n_fft//2+1)
        static = (self.bins(power) + c.log_eps).log()
        feats = [static]
        for _ in range(c.delta_order):
            feats.append(spectral.deltas(feats[-1], out_len))
        return torch.cat(feats, dim=-1), out_len


class LogMelFrontEnd(_StftFrontEnd):
    """``logmel``: HTK mel filters without normalisation over the power spectrum."""

    def __init__(self, config: FrontEndConfig):
        super().__init__(config)
        self.register_buffer("mel", spectral.mel_filterbank(config.sample_rate, config.n_fft, config.n_mels),
                             persistent=False)

    def bins(self, power: torch.Tensor) -> torch.Tensor:
        return power @ self.mel  # (B, T, n_mels)


class LinearFrontEnd(_StftFrontEnd):
    """``linear``: every one of the ``n_fft // 2 + 1`` power bins."""

    @staticmethod
    def static_dim(config: FrontEndConfig) -> int:
        return config.n_fft // 2 + 1


class FbankFrontEnd(FrontEnd):
    """``fbank``: Kaldi-style log-mel filterbank as SSAST computes it, then SSAST's
    ``(x - mean) / (2 * std)`` (``fbank_normalize``)."""

    centered = False

    def __init__(self, config: FrontEndConfig):
        super().__init__(config)
        c = config
        self.fft_size = 1 << math.ceil(math.log2(c.win_length))
        self.register_buffer("window", spectral.kaldi_hanning(c.win_length), persistent=False)
        self.register_buffer("mel", spectral.kaldi_mel_banks(c.n_mels, self.fft_size, c.sample_rate),
                             persistent=False)

    def min_samples(self) -> int:
        return self.config.win_length

    def raw_features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        # SSAST subtracts the waveform mean before Kaldi fbank (over valid samples only).
        mean = wavs.sum(1, keepdim=True) / lengths.clamp(min=1).unsqueeze(1)
        wavs = (wavs - mean) * (~spectral.padding_mask(lengths, wavs.shape[1]))
        frames, out_len = spectral.frame_signal(wavs, lengths, c.win_length, c.hop_length, center=False)
        frames = frames - frames.mean(-1, keepdim=True)  # remove DC offset per frame
        # Pre-emphasis 0.97; Kaldi uses the first sample itself as its predecessor.
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - 0.97 * prev) * self.window
        power = torch.fft.rfft(frames, n=self.fft_size, dim=-1).abs().pow(2)  # (B, T, 257)
        feats = (power @ self.mel).clamp(min=_KALDI_EPS).log()
        if c.fbank_normalize:
            feats = (feats - c.fbank_mean) / (2 * c.fbank_std)
        return feats, out_len

    @classmethod
    def measuring_config(cls, config: FrontEndConfig) -> FrontEndConfig:
        return config.replace(fbank_normalize=False, cmvn="none")

    @classmethod
    def with_stats(cls, config: FrontEndConfig, s1: torch.Tensor, s2: torch.Tensor, total: int
                   ) -> FrontEndConfig:
        """SSAST's dataset normalisation: one scalar mean / std over every value."""
        n = total * s1.numel()
        mean = s1.sum() / n
        std = ((s2.sum() / n - mean ** 2).clamp(min=0) * n / (n - 1)).sqrt()
        log.info("fbank statistics over %d frames: mean %.4f std %.4f", total, mean, std)
        return config.replace(fbank_mean=float(mean), fbank_std=float(std), fbank_normalize=True)


#: ``FrontEndConfig.kind`` -> its front-end class: the one place a kind is looked up.
FRONTEND_KINDS: dict[str, type[FrontEnd]] = {
    "logmel": LogMelFrontEnd,
    "linear": LinearFrontEnd,
    "fbank": FbankFrontEnd,
}


def build_frontend(config: FrontEndConfig) -> FrontEnd:
    """Build the front-end described by ``config``."""
    return FRONTEND_KINDS[config.kind](config)


def compute_global_stats(config: FrontEndConfig, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                         ) -> FrontEndConfig:
    """Compute corpus statistics once and return a config that applies them.

    For ``fbank`` the scalar mean / std of all valid values (SSAST's dataset normalisation);
    for the others per-dimension mean / std for ``cmvn="global"``. Accumulated in float64.

    Args:
        config: front-end config; its own CMVN / normalisation is switched off while measuring.
        batches: iterable of (wavs (B, N), lengths (B,)).

    Returns:
        ``config`` with the statistics filled in.
    """
    kind = FRONTEND_KINDS[config.kind]
    raw = kind(kind.measuring_config(config))
    total = 0
    s1 = torch.zeros(raw.dim, dtype=torch.float64)
    s2 = torch.zeros(raw.dim, dtype=torch.float64)
    for wavs, lengths in batches:
        feats, out_len = raw(wavs, lengths)
        valid = ~spectral.padding_mask(out_len, feats.shape[1])
        x = feats[valid].double()  # (frames, D)
        total += x.shape[0]
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    if total < 2:
        raise ValueError("compute_global_stats: fewer than 2 frames in the corpus")
    return kind.with_stats(config, s1, s2, total)
