"""The upstream interface shared by every pretrained model (:func:`aviary.load` returns one).

An *upstream* turns raw 16 kHz waveforms into every layer's representation. It owns its
front-end, so callers never compute features themselves::

    model = aviary.load("runs/aalbert-3l")
    hidden_states, lengths = model.extract(wavs, wav_lengths)
    # hidden_states: list of L+1 tensors (B, T, H); hidden_states[0] is the embedding output
    # lengths: (B,) valid output frames; frame k covers time k * model.frame_shift seconds
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from aviary.lengths import valid_mask


class Upstream(nn.Module):
    """Base class of everything :func:`load` returns.

    Subclasses set ``frame_shift`` (seconds per output frame), ``hidden_size`` and
    ``num_hidden_states`` (L + 1: the embedding output counts) and implement :meth:`extract`.
    """

    frame_shift: float
    hidden_size: int
    num_hidden_states: int
    sample_rate: int = 16000

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden states for a padded batch of waveforms.

        Args:
            wavs: (B, N) float waveforms at ``sample_rate`` (or (N,) for one utterance).
            wav_lengths: (B,) valid samples per row; ``None`` means all rows are full length.
            max_layer: stop after this layer (0 = embedding output only); ``None`` = all.

        Returns:
            (hidden_states, lengths): a list of ``min(max_layer, L) + 1`` tensors (B, T, H) and
            (B,) valid frames per row. Padded positions hold unspecified values.
        """
        raise NotImplementedError

    def attentions(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's attention probabilities: (L tensors (B, heads, T, T), (B,) lengths).

        Only upstreams with self-attention over frames implement it (the MAM family).
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose attention maps "
                                  "(the masked acoustic models do: Mockingjay, AALBERT, TERA)")

    @staticmethod
    def as_batch(wavs: torch.Tensor, wav_lengths: torch.Tensor | None,
                  check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise (N,) / (B, N) input and default lengths; checks shapes.

        With ``check_finite`` (extraction), a row holding NaN / inf samples within its length
        is an error naming the row: its hidden states would be all NaN, without a word.
        Pretraining passes ``False``: the loop skips and counts non-finite steps itself.
        """
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        if wavs.dim() != 2:
            raise ValueError(f"wavs must be (B, N) or (N,), got shape {tuple(wavs.shape)}")
        if wav_lengths is None:
            wav_lengths = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        wav_lengths = torch.as_tensor(wav_lengths, dtype=torch.long, device=wavs.device)
        if wav_lengths.shape != (wavs.shape[0],):
            raise ValueError(f"wav_lengths must be ({wavs.shape[0]},), got {tuple(wav_lengths.shape)}")
        if int(wav_lengths.max()) > wavs.shape[1]:
            raise ValueError(f"wav_lengths max {int(wav_lengths.max())} > padded length {wavs.shape[1]}")
        wavs = wavs.float()
        if check_finite:
            inside = valid_mask(wav_lengths, wavs.shape[1])  # (B, N)
            bad = (~torch.isfinite(wavs) & inside).sum(1)  # (B,)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise ValueError(f"wavs row(s) {rows[:5]} hold non-finite (NaN / inf) samples "
                                 f"({int(bad[rows[0]])} in row {rows[0]}); their hidden states would be NaN. "
                                 "Check the audio (`aviary check-data`)")
        return wavs, wav_lengths


UPSTREAM_PREFIX = "upstream."
"""A pretraining model holds its upstream as the sub-module ``upstream``: its weights are the
state dict's ``upstream.*`` keys."""


def upstream_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The upstream's own weights out of a pretraining model's state dict (``upstream.`` removed).

    A state dict without ``upstream.*`` keys is taken to be an upstream's own (bundles
    exported for extraction store the upstream alone) and returned as it is.
    """
    sub = {k[len(UPSTREAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(UPSTREAM_PREFIX)}
    return sub if sub else dict(tensors)
