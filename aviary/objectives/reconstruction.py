"""Masked reconstruction loss (Mockingjay / Audio ALBERT / TERA).

The model predicts the target spectrogram (log-mel or log-linear) at every frame; the loss
is the L1 distance on the frames selected by the masking only (Mockingjay section 2.2):

    L = sum_{b,t,d} M[b,t] * |pred[b,t,d] - target[b,t,d]| / (D * sum_{b,t} M[b,t])

i.e. the mean absolute error over the masked elements (s3prl's ``L1Loss`` on
``masked_select``). Unmasked and padded frames contribute nothing, not even to the
denominator.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn

from aviary.lengths import valid_mask
from aviary.objectives.base import Objective, ObjectiveOutput
from aviary.objectives.masking import MaskingConfig, mam_mask


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              lengths: torch.Tensor | None = None, return_extras: bool = False) -> ObjectiveOutput:
    """Mean L1 over the masked frames.

    Args:
        pred: (B, T, D) predictions.
        target: (B, T, D) targets (no gradient needed).
        mask: (B, T) bool, frames to score; padding must be False.
        lengths: (B,) valid frames per row, only for the ``masked_frac`` metric
            (without it the fraction is taken over all B * T frames).
        return_extras: also return ``pred``, ``target`` and ``mask`` (detached) in ``extras``.

    Returns:
        :class:`ObjectiveOutput` with ``loss`` (0-d, fp32; exactly 0 with a gradient path when
        nothing is masked), ``metrics`` ``{"l1", "masked_frac", "masked_frames"}`` where
        ``masked_frac`` = masked frames / valid frames, and, with ``lengths``, ``l1_utt_mean``:
        the same L1 for the utterance-mean predictor (each row's mean target over its valid
        frames), the plateau a model that has not learned sits on.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")
    m = mask.to(torch.float32)[..., None]  # (B, T, 1)
    n_frames = m.sum()
    n_valid = float(mask.numel()) if lengths is None else lengths.sum().clamp(min=1).float()
    abs_err = (pred.float() - target.float()).abs() * m  # (B, T, D); unmasked frames -> 0
    denom = (n_frames * pred.shape[-1]).clamp(min=1.0)
    loss = abs_err.sum() / denom
    metrics = {"l1": loss.detach(), "masked_frames": n_frames.detach(),
               "masked_frac": (n_frames / n_valid).detach()}
    if lengths is not None:
        with torch.no_grad():
            valid = valid_mask(lengths, target.shape[1]).to(torch.float32)[..., None]  # (B, T, 1)
            mean = (target.float() * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)
            metrics["l1_utt_mean"] = ((mean - target.float()).abs() * m).sum() / denom  # (B, 1, D) vs (B, T, D)
    extras = {}
    if return_extras:
        extras = {"pred": pred.detach(), "target": target.detach(), "mask": mask.detach()}
    return ObjectiveOutput(loss=loss, metrics=metrics, extras=extras)


class FrameEncoderUpstream(Protocol):
    """What :class:`MaskedReconstruction` needs from an upstream (``aviary.models.mam.MAMUpstream``):
    fp32 front-end features and an encoder that stacks R frames and encodes (hidden states, ...)."""

    encoder: Any  # .downsample (R), .stack(feats, lengths), .encode(x, lengths) -> (hidden_states, ...)

    def as_batch(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None,
                 check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    def features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class MaskedReconstruction(Objective):
    """Mockingjay / Audio ALBERT / TERA: corrupt stacked frames, encode, predict, masked L1.

    Args:
        masking: span / 80-10-10 / TERA settings (:func:`~aviary.objectives.masking.mam_mask`).
        head: (B, T', H) -> (B, T' * R, D_t) predictions (``aviary.models.heads.SpecHead``).
        target_dim: D_t.
        target_frontend: waveform -> target spectrogram; ``None`` when the target is the
            static part of the input features (its first ``target_dim`` bins: static bins
            come first and CMVN is per dimension), so the spectrogram is computed once.

    ``forward`` reads ``wavs`` (B, N), ``wav_lengths`` (B,) and optionally ``mask`` (B, T')
    bool at the encoder frame rate (pins the masked frames; the 80/10/10 and TERA draws
    still come from ``generator``). Metrics: ``l1``, ``masked_frac``, ``masked_frames``,
    ``l1_utt_mean``, ``frames``; extras ``pred``, ``target``, ``mask`` (frame rate),
    ``inputs``, ``time_mask`` (encoder rate), ``feats`` (all detached).
    """

    # Checkpoints of the masked acoustic models keep their head at ``head.*``.
    state_prefix = ""

    def __init__(self, masking: MaskingConfig, head: nn.Module, target_dim: int,
                 target_frontend: nn.Module | None = None) -> None:
        super().__init__()
        self.masking = masking
        self.head = head
        self.target_dim = target_dim
        self.target_frontend = target_frontend

    @torch.no_grad()
    def features_and_target(self, upstream: FrameEncoderUpstream, wavs: torch.Tensor, wav_lengths: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input features (B, T, D_in), frames (B,), target (B, T, D_t)), in fp32."""
        feats, flen = upstream.features(wavs, wav_lengths)  # (B, T, D_in)
        if self.target_frontend is None:
            return feats, flen, feats[..., :self.target_dim]
        with torch.autocast(device_type=wavs.device.type, enabled=False):
            target, tlen = self.target_frontend(wavs.float(), wav_lengths)  # (B, T, D_t)
        if not torch.equal(tlen, flen):
            raise RuntimeError(f"target frames {tlen.tolist()} differ from input frames {flen.tolist()}")
        return feats, flen, target

    def forward(self, upstream: FrameEncoderUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        wavs, wav_lengths = upstream.as_batch(batch["wavs"], batch.get("wav_lengths"), check_finite=False)
        feats, flen, target = self.features_and_target(upstream, wavs, wav_lengths)
        enc = upstream.encoder
        R = enc.downsample
        stacked, slen = enc.stack(feats, flen)  # (B, T', D*R)
        # Mask at the encoder frame rate (s3prl process_train_MAM_data does the same).
        m = mam_mask(stacked, slen, self.masking, generator=generator, time_mask=batch.get("mask"), stack=R)
        hidden_states, _ = enc.encode(m.inputs, slen)
        T = target.shape[1]
        pred = self.head(hidden_states[-1])[:, :T]  # (B, T, D_t)
        # A masked encoder frame hides all R frames it stacks; frames past the row's length
        # (the zero-filled tail of the last group, and padding) are never scored.
        frame_mask = m.time_mask.repeat_interleave(R, dim=1)[:, :T] & valid_mask(flen, T)  # (B, T)
        out = masked_l1(pred, target, frame_mask, lengths=flen, return_extras=True)
        out.metrics["frames"] = int(flen.sum())
        out.extras.update(inputs=m.inputs.detach(), time_mask=m.time_mask, feats=feats)
        return out
