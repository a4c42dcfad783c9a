"""Masks of every objective, as pure, seeded, batched functions; MAM input corruption.

Two span masks: :func:`span_mask` picks an exact number of spans per row (Mockingjay's
"15 % of the frames"), :func:`bernoulli_span_mask` lets every position start a span with a
fixed probability (vq-wav2vec's BERT, wav2vec 2.0, BEST-RQ, HuBERT).

Mockingjay (Liu et al. 2020, section 2.2), dynamic masking decided at every step:

1. pick spans of C consecutive frames until about 15 % of each utterance's valid frames are
   selected: ``n_spans = round(T_valid * 0.15 / C)`` span starts, drawn without replacement
   from ``[0, T_valid - C]`` so spans may overlap but never reach into padding;
2. ONE draw per utterance (not per frame): with probability 0.8 the selected frames are set
   to zero, 0.1 replaced by frames from random positions of the same utterance, 0.1 kept;
3. the loss is computed on the selected frames only (whatever happened to their input).

TERA (Liu et al. 2021) adds alterations along the other two axes:

* frequency: one contiguous band of width ``U{0, ..., floor(0.2 * D)}`` zeroed over all frames;
* magnitude: with probability 0.15 per utterance, Gaussian noise N(0, 0.2) added to every
  valid frame.

With frame stacking (R > 1) aviary masks at the encoder's (stacked) frame rate, exactly as
s3prl's ``process_train_MAM_data`` does: the features are stacked first, spans of C stacked
frames are chosen (C = 3 with R = 3), and a masked stacked frame hides all R original frames
it holds. Callers therefore pass the stacked features and lengths here.

Compared with s3prl's ``process_train_MAM_data`` (checked against its source):

* same: masking at the stacked rate, ``round(len * 0.15 / C)`` distinct span starts
  (``randperm``), overlapping spans allowed, one 80/10/10 dice per utterance, rows without
  any masked frame contributing nothing to the loss (s3prl drops them from the batch);
* starts: s3prl draws them from ``[0, len - C - 1]``, aviary from ``[0, len - C]`` (a span
  may end on the last frame);
* "random" replacement: s3prl copies random spans, aviary frames from random positions
  (REFERENCE.md's wording), per frame;
* frequency band: s3prl's width is ``U{0..mask_frequency}`` bins and the band is also scored
  (element-wise loss mask); aviary uses ``U{0..floor(0.2 D)}`` (TERA paper) and scores time-
  masked frames only, since a band of input bins has no counterpart in a different target
  (e.g. 201 linear bins);
* magnitude noise: s3prl throws one dice per batch and also noises padding; aviary throws
  one per utterance and noises valid frames only.

Everything is batched: no Python loop runs over utterances, and every random number comes
from the ``torch.Generator`` passed in, so a seeded call repeats exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aviary.config import Config, check, check_range
from aviary.lengths import padding_mask, valid_mask


@dataclass(frozen=True)
class MaskingConfig(Config):
    """Settings of :func:`mam_mask` (defaults: Mockingjay with R = 1)."""

    mask_proportion: float = 0.15  # fraction of valid frames to select
    span: int = 7  # C: consecutive frames per span (3 when R = 3)
    zero_prob: float = 0.8  # per utterance: selected frames set to 0
    random_prob: float = 0.1  # per utterance: selected frames replaced by random frames
    # (the remaining 1 - zero_prob - random_prob keeps the selected frames unchanged)
    freq_mask_ratio: float = 0.0  # TERA: max band width as a fraction of D (0.2); 0 = off
    noise_prob: float = 0.0  # TERA: per-utterance probability of magnitude noise (0.15)
    noise_std: float = 0.2  # TERA: std of that noise

    def validate(self) -> None:
        check_range("mask_proportion", self.mask_proportion, 0.0, 1.0)
        check_range("span", self.span, 1)
        check_range("zero_prob", self.zero_prob, 0.0, 1.0)
        check_range("random_prob", self.random_prob, 0.0, 1.0)
        check(self.zero_prob + self.random_prob <= 1.0 + 1e-9, "random_prob", self.random_prob,
              f"<= 1 - zero_prob = {1 - self.zero_prob}")
        check_range("freq_mask_ratio", self.freq_mask_ratio, 0.0, 1.0)
        check_range("noise_prob", self.noise_prob, 0.0, 1.0)
        check_range("noise_std", self.noise_std, 0.0)


@dataclass
class MaskOutput:
    """Result of :func:`mam_mask`.

    Attributes:
        inputs: (B, T, D) corrupted features (the encoder's input).
        time_mask: (B, T) bool, frames selected for prediction (the loss's frames).
        action: (B,) long per utterance: 0 = zeroed, 1 = random frames, 2 = kept.
        freq_mask: (B, D) bool, the zeroed TERA frequency band (all False when off; with
            ``stack`` = R the same band in each of the R frames).
        noised: (B,) bool, utterances that received magnitude noise.
    """

    inputs: torch.Tensor
    time_mask: torch.Tensor
    action: torch.Tensor
    freq_mask: torch.Tensor
    noised: torch.Tensor


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def span_mask(lengths: torch.Tensor, T: int, proportion: float, span: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Select spans of ``span`` frames covering about ``proportion`` of each row's valid frames.

    Args:
        lengths: (B,) valid frames per row.
        T: padded length.
        proportion: target fraction (0.15).
        span: C, frames per span.
        generator: seeds the draw.

    Returns:
        (B, T) bool: ``round(len * proportion / C)`` span starts per row, distinct, uniform
        over ``[0, len - C]``; spans may overlap; nothing at or past ``len`` is selected.
        Rows shorter than ``C`` frames get no span.
    """
    B = lengths.shape[0]
    device = lengths.device
    n_spans = torch.round(lengths.double() * proportion / span).long()  # (B,)
    n_starts = (lengths - span + 1).clamp(min=0)  # (B,) number of allowed start positions
    n_spans = torch.minimum(n_spans, n_starts)
    # Distinct starts without a loop: give every allowed start a random key and keep the
    # n_spans[b] smallest keys of row b (a random subset of size n_spans[b]).
    keys = _rand((B, T), generator, device)
    keys = keys.masked_fill(padding_mask(n_starts, T), 2.0)  # forbidden starts sort last
    rank = keys.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each key within its row
    starts = rank < n_spans[:, None]  # (B, T) bool
    # Frame t is covered iff some start lies in (t - C, t]: a sliding-window count via cumsum.
    c = starts.long().cumsum(dim=1)  # (B, T)
    c_shift = F.pad(c, (span, 0))[:, :T]  # c[t - C], 0 before the start
    return (c - c_shift) > 0


def bernoulli_span_mask(lengths: torch.Tensor, max_len: int, start_prob: float = 0.05, span_length: int = 10,
                        generator: torch.Generator | None = None, min_masked: int = 1) -> torch.Tensor:
    """Overlapping spans from independent starts (vq-wav2vec's BERT, wav2vec 2.0), batched, seeded.

    Each valid position starts a span with probability ``start_prob``; a position is masked
    when a span started at one of the ``span_length`` positions up to and including it.
    Spans are clipped at the sequence end and never touch padding. Rows where no span
    started get ``min_masked`` spans at random starts (a batch row without targets would
    waste its compute).

    Args:
        lengths: (B,) valid tokens per row.
        max_len: T.
        start_prob: span start probability p.
        span_length: M.
        generator: optional seeded generator.
        min_masked: spans forced into rows that drew none (0 disables).

    Returns:
        (B, T) bool, True = masked.
    """
    b = lengths.shape[0]
    dev = lengths.device
    valid = valid_mask(lengths, max_len)  # (B, T)
    starts = (torch.rand((b, max_len), generator=generator, device=dev) < start_prob) & valid
    if min_masked > 0:
        empty = ~starts.any(1) & (lengths > 0)  # (B,)
        # Random starts for empty rows: argsort of uniform noise over the valid positions.
        noise = torch.rand((b, max_len), generator=generator, device=dev).masked_fill(~valid, 2.0)
        ranks = noise.argsort(1).argsort(1)  # rank of each position's noise within its row
        forced = (ranks < min_masked) & valid & empty.unsqueeze(1)
        starts = starts | forced
    # masked[t] = any(starts[t - M + 1 .. t]): a running count of starts over a window of M.
    c = F.pad(starts.long().cumsum(1), (span_length, 0))  # (B, T + M), c[:, M + t] = #starts <= t
    window = c[:, span_length:] - c[:, :max_len]
    return (window > 0) & valid


def mam_mask(feats: torch.Tensor, lengths: torch.Tensor, cfg: MaskingConfig,
             generator: torch.Generator | None = None, time_mask: torch.Tensor | None = None,
             stack: int = 1) -> MaskOutput:
    """Corrupt a padded batch of features for masked acoustic modelling.

    Args:
        feats: (B, T, D) features at the encoder frame rate (stacked when R > 1).
        lengths: (B,) valid frames per row.
        cfg: masking settings.
        generator: a ``torch.Generator`` on ``feats.device`` for repeatable draws.
        time_mask: (B, T) bool frames to select, to bypass the span draw (tests, analysis);
            must not touch padding.
        stack: R, when ``feats`` are R stacked frames of ``D / R`` bins each: the TERA band is
            then drawn over the ``D / R`` bins of one frame and zeroed in all R of them (a band
            of frequencies, not a stretch of the stacked vector).

    Returns:
        :class:`MaskOutput`; the input tensor is not modified.
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be (B, T, D), got shape {tuple(feats.shape)}")
    B, T, D = feats.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be ({B},), got shape {tuple(lengths.shape)}")
    device = feats.device
    valid = valid_mask(lengths, T)  # (B, T)
    if time_mask is None:
        time_mask = span_mask(lengths, T, cfg.mask_proportion, cfg.span, generator)
    else:
        if time_mask.shape != (B, T):
            raise ValueError(f"time_mask must be ({B}, {T}), got shape {tuple(time_mask.shape)}")
        time_mask = time_mask.bool()
        if bool((time_mask & ~valid).any()):
            raise ValueError("time_mask selects padding frames (at or past lengths)")

    # One 80/10/10 decision per utterance (Mockingjay section 2.2).
    u = _rand((B,), generator, device)
    action = torch.full((B,), 2, dtype=torch.long, device=device)
    action[u < cfg.zero_prob + cfg.random_prob] = 1
    action[u < cfg.zero_prob] = 0
    # Random replacement frames are drawn for every position (cheap) and used only where
    # the utterance's action is "random": index ~ U{0, ..., len - 1} of the same utterance.
    rand_idx = (_rand((B, T), generator, device) * lengths[:, None].clamp(min=1)).long()  # (B, T)
    random_frames = feats.gather(1, rand_idx[..., None].expand(B, T, D))  # (B, T, D)

    sel = time_mask[..., None]  # (B, T, 1)
    out = torch.where(sel & (action == 0)[:, None, None], torch.zeros((), dtype=feats.dtype, device=device), feats)
    out = torch.where(sel & (action == 1)[:, None, None], random_frames, out)

    # TERA frequency alteration: band width ~ U{0..floor(ratio * F)}, start ~ U{0..F - width}
    # over the F = D / R bins of one frame, the same band in each of the R stacked frames.
    if stack < 1 or D % stack:
        raise ValueError(f"stack={stack} does not divide the feature dimension {D}")
    F = D // stack
    freq_mask = torch.zeros(B, D, dtype=torch.bool, device=device)
    max_width = int(cfg.freq_mask_ratio * F)
    if max_width > 0:
        width = (_rand((B,), generator, device) * (max_width + 1)).long()  # (B,)
        start = (_rand((B,), generator, device) * (F - width + 1).float()).long()  # (B,)
        f = torch.arange(F, device=device)[None, :]
        band = (f >= start[:, None]) & (f < (start + width)[:, None])  # (B, F)
        freq_mask = band.repeat(1, stack)  # (B, R * F): stacked frames are [frame 0 | frame 1 | ...]
        out = out.masked_fill(freq_mask[:, None, :] & valid[..., None], 0.0)  # padding untouched

    # TERA magnitude alteration: Gaussian noise on every valid frame of some utterances.
    noised = torch.zeros(B, dtype=torch.bool, device=device)
    if cfg.noise_prob > 0 and cfg.noise_std > 0:
        noised = _rand((B,), generator, device) < cfg.noise_prob
        noise = torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype) * cfg.noise_std
        out = out + noise * (noised[:, None] & valid)[..., None].to(out.dtype)

    return MaskOutput(inputs=out, time_mask=time_mask, action=action, freq_mask=freq_mask, noised=noised)
