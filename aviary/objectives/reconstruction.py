"""Masked reconstruction loss (Mockingjay / Audio ALBERT / TERA).

The model predicts the target spectrogram (log-mel or log-linear) at every frame; the loss
is the L1 distance on the frames selected by the masking only (Mockingjay section 2.2):

    L = sum_{b,t,d} M[b,t] * |pred[b,t,d] - target[b,t,d]| / (D * sum_{b,t} M[b,t])

i.e. the mean absolute error over the masked elements (s3prl's ``L1Loss`` on
``masked_select``). Unmasked and padded frames contribute nothing, not even to the
denominator.
"""
from __future__ import annotations

import torch

from aviary.objectives.base import ObjectiveOutput


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
            valid = (torch.arange(target.shape[1], device=target.device)[None, :] < lengths[:, None])
            valid = valid.to(torch.float32)[..., None]  # (B, T, 1)
            mean = (target.float() * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)
            metrics["l1_utt_mean"] = ((mean - target.float()).abs() * m).sum() / denom  # (B, 1, D) vs (B, T, D)
    extras = {}
    if return_extras:
        extras = {"pred": pred.detach(), "target": target.detach(), "mask": mask.detach()}
    return ObjectiveOutput(loss=loss, metrics=metrics, extras=extras)
