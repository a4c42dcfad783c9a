"""Masked spectrogram patch modelling (MSPM), the SSAST pretraining objective.

Gong et al., "SSAST: Self-Supervised Audio Spectrogram Transformer" (AAAI 2022), section 2.
A fraction of the spectrogram patches (400 of the 512 patches of a 10.24 s clip) is replaced
by a learnable mask token inside the encoder; two small heads read the encoder output at the
masked positions:

* a **discriminative** head whose prediction ``c_i`` must pick out its own input patch
  ``x_i`` among the other masked patches of the same clip (InfoNCE, the paper's Eq. 1):

      L_d = -1/N * sum_i log( exp(c_i . x_i) / sum_j exp(c_i . x_j) )

* a **generative** head that reconstructs the (normalised) input patch (Eq. 2, MSE).

The joint loss is ``L_d + 10 * L_g`` (Eq. 3), computed from ONE forward pass (the reference
code runs the encoder twice with two different masks; the paper describes one).

The reference code normalises its softmax over the *predictions* for each target (it builds
``targets @ predictions^T`` and takes the log-softmax over the last axis); here the softmax
runs over the *targets* for each prediction, as Eq. 1 is written.

Masks come from pure, seeded, batched functions (:mod:`aviary.objectives.patch_masks`)
that never select padding and always select exactly the requested number of patches. The
objective takes the encoder as an argument rather than owning it, so the pretraining
model's state dict holds the encoder once (under ``upstream.``).

Variable lengths: clips in a batch may have different numbers of valid patches and hence
different numbers of masked patches. The masked patches are gathered into a padded
(B, M_max, ...) tensor with a validity mask; invalid targets are excluded from every
softmax and invalid predictions from every mean, so the whole batch is one batched matmul
with no per-clip Python loop (when all clips have the same count, nothing is padded).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import Config, check, check_choice, check_range
from aviary.lengths import padding_mask
from aviary.objectives.base import Objective, ObjectiveOutput
from aviary.objectives.patch_masks import cluster_mask, gather_masked, num_masked_for, random_mask

__all__ = ["MSPM", "MSPMConfig", "cluster_mask", "crop_frames", "gather_masked", "infonce", "masked_mse",
           "num_masked_for", "random_mask"]


@dataclasses.dataclass(frozen=True)
class MSPMConfig(Config):
    """Masking and loss settings of masked spectrogram patch modelling.

    Attributes:
        masking: ``"cluster"`` (C x C blocks of patches; the paper's choice for patch models)
            or ``"random"`` (independent patches; the paper found clustering hurts frame models).
        num_masked: patches masked per ``num_masked_of`` valid patches. The paper masks 400 of
            the 512 patches of a 1024-frame clip; a clip with fewer valid patches gets
            proportionally fewer (rounded), so the masked FRACTION is what is kept.
        num_masked_of: the reference patch count for ``num_masked`` (512 in the paper).
        cluster_sizes: block side lengths C drawn uniformly per clip (paper: {3, 4, 5}).
        gen_weight: weight of the generative MSE loss (paper: 10).
        disc_weight: weight of the discriminative InfoNCE loss (paper: 1).
        head_hidden: hidden width of both heads; 0 = the encoder width D (paper: D).
    """

    masking: str = "cluster"
    num_masked: int = 400
    num_masked_of: int = 512
    cluster_sizes: tuple[int, ...] = (3, 4, 5)
    gen_weight: float = 10.0
    disc_weight: float = 1.0
    head_hidden: int = 0

    def validate(self) -> None:
        check_choice("masking", self.masking, ("cluster", "random"))
        check_range("num_masked_of", self.num_masked_of, 1)
        check_range("num_masked", self.num_masked, 1, self.num_masked_of)
        check(len(self.cluster_sizes) > 0 and all(c >= 1 for c in self.cluster_sizes),
              "cluster_sizes", self.cluster_sizes, "a non-empty list of sizes >= 1")
        check_range("gen_weight", self.gen_weight, 0.0)
        check_range("disc_weight", self.disc_weight, 0.0)
        check(self.gen_weight + self.disc_weight > 0, "gen_weight", self.gen_weight,
              "gen_weight + disc_weight > 0")
        check_range("head_hidden", self.head_hidden, 0)

    @property
    def mask_ratio(self) -> float:
        return self.num_masked / self.num_masked_of


def infonce(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminative loss of SSAST (Eq. 1), batched over clips.

    For clip b, ``logits[b, i, j] = pred[b, i] . target[b, j]`` over its masked patches;
    each prediction's positive is its own patch (the diagonal), the negatives the other
    masked patches of the same clip; cross-entropy runs over the targets axis ``j``.

    Args:
        pred: (B, M, K) predictions of the discriminative head.
        target: (B, M, K) input patches at the same positions.
        valid: (B, M) bool, False for padding rows of clips with fewer masked patches.

    Returns:
        (loss, accuracy): the mean negative log-likelihood over valid predictions and the
        fraction of valid predictions whose highest-scoring target is their own patch.
    """
    pred, target = pred.float(), target.float()
    logits = torch.bmm(pred, target.transpose(1, 2))  # (B, M, M)
    # A finite fill (not -inf) keeps rows of clips with no valid target NaN-free.
    logits = logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min)
    logp = F.log_softmax(logits, dim=-1)
    pos = logp.diagonal(dim1=1, dim2=2)  # (B, M) log p(own patch | prediction)
    n = valid.sum().clamp(min=1)
    loss = -(pos.masked_fill(~valid, 0.0)).sum() / n
    arange = torch.arange(logits.shape[-1], device=logits.device)
    correct = (logits.argmax(-1) == arange) & valid
    return loss, correct.sum().float() / n


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Generative loss of SSAST (Eq. 2): mean squared error over valid masked patches.

    Args:
        pred, target: (B, M, K); valid: (B, M) bool.

    Returns:
        Scalar: mean over valid patches and the K values of each patch.
    """
    err = (pred.float() - target.float()).pow(2).mean(-1)  # (B, M)
    return err.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)


class PatchEncoder(Protocol):
    """What :class:`MSPM` needs from an encoder (``aviary.models.ssast.SSASTEncoder``)."""

    hidden_size: int
    patch_dim: int
    num_prefix_tokens: int

    def patchify(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, feats: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None,
                 max_layer: int | None = None) -> Any: ...


def _head(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    # Linear -> ReLU -> Linear, as both SSAST heads (cpredlayer / gpredlayer).
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class PatchUpstream(Protocol):
    """What :class:`MSPM` needs from an upstream (``aviary.models.ssast.SSASTUpstream``)."""

    frontend: Any  # (wavs, wav_lengths) -> (feats (B, T, F), lengths (B,))
    encoder: PatchEncoder

    def as_batch(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None,
                 check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...


def crop_frames(feats: torch.Tensor, lengths: torch.Tensor, max_frames: int, random: bool,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop every clip longer than ``max_frames`` to a window of that many frames.

    Args:
        feats: (B, T, F); lengths: (B,).
        max_frames: window length.
        random: uniformly random window start (training) or the clip's start (evaluation).
        generator: seeds the window starts.

    Returns:
        (feats (B, min(T, max_frames), F) with zeroed padding, new lengths (B,)).
    """
    B, T, Fq = feats.shape
    if T <= max_frames:
        return feats, lengths
    slack = (lengths - max_frames).clamp(min=0)  # (B,) possible start offsets - 1
    if random:
        u = torch.rand(B, generator=generator, device=feats.device)
        start = (u * (slack + 1)).floor().long().clamp(max=slack)
    else:
        start = torch.zeros_like(slack)
    idx = start[:, None] + torch.arange(max_frames, device=feats.device)[None, :]  # (B, max_frames)
    out = torch.gather(feats, 1, idx[..., None].expand(-1, -1, Fq))
    new_len = lengths.clamp(max=max_frames)
    return out.masked_fill(padding_mask(new_len, max_frames)[..., None], 0.0), new_len


class MSPM(Objective):
    """The two SSAST heads and the joint loss, on the upstream passed to :meth:`forward`.

    Args:
        cfg: masking and loss settings.
        hidden_size: encoder width D.
        patch_dim: values per patch K (256 for 16 x 16 and 128 x 2 patches).
        max_frames: pretraining clips longer than this are cropped to it (randomly in
            training, from the start in eval mode).
    """

    def __init__(self, cfg: MSPMConfig, hidden_size: int, patch_dim: int, max_frames: int = 1024):
        super().__init__()
        self.config = cfg
        self.max_frames = max_frames
        h = cfg.head_hidden or hidden_size
        # Both heads keep PyTorch's default Linear initialisation, as in the reference code.
        self.disc_head = _head(hidden_size, h, patch_dim)  # "cpredlayer" in the reference
        self.gen_head = _head(hidden_size, h, patch_dim)   # "gpredlayer"

    def make_mask(self, grid_valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw the mask for a (B, T, F) grid of valid patches; returns (B, T*F) bool (time-major)."""
        cfg = self.config
        n = num_masked_for(grid_valid.sum((1, 2)), cfg.num_masked, cfg.num_masked_of)
        if cfg.masking == "cluster":
            return cluster_mask(grid_valid, n, cfg.cluster_sizes, generator).flatten(1)
        return random_mask(grid_valid.flatten(1), n, generator)

    def forward(self, upstream: PatchUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        """Waveforms -> fbank -> crop -> :meth:`loss`.

        ``batch``: ``wavs`` (B, N), ``wav_lengths`` (B,), optionally ``mask`` (B, Tg * Fg)
        bool over the patch tokens (time-major) to pin the masked patches. The crop and the
        mask are drawn from ``generator``.
        """
        wavs, wav_lengths = upstream.as_batch(batch["wavs"], batch.get("wav_lengths"), check_finite=False)
        feats, flen = upstream.frontend(wavs, wav_lengths)  # (B, T, F)
        feats, flen = crop_frames(feats, flen, self.max_frames, self.training, generator)
        return self.loss(upstream.encoder, feats, flen, mask=batch.get("mask"), generator=generator)

    def loss(self, encoder: PatchEncoder, feats: torch.Tensor, lengths: torch.Tensor,
             mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One MSPM step on features: mask, encode once, score both heads.

        Args:
            encoder: the patch encoder (see :class:`PatchEncoder`).
            feats: (B, T, F) normalised fbank features.
            lengths: (B,) valid frames.
            mask: optional (B, N) bool mask over the encoder's patch tokens (time-major);
                drawn with ``generator`` when omitted.
            generator: seeds the mask.

        Returns:
            ObjectiveOutput with ``loss`` = disc_weight * InfoNCE + gen_weight * MSE and
            metrics ``infonce``, ``mse``, ``acc`` (masked-patch retrieval accuracy),
            ``chance_acc`` (what guessing among each clip's masked patches gets),
            ``masked_frac``; extras ``mask``.
        """
        cfg = self.config
        patches, grid_valid = encoder.patchify(feats, lengths)  # (B, N, K), (B, Tg, Fg)
        valid = grid_valid.flatten(1)  # (B, N)
        if mask is None:
            mask = self.make_mask(grid_valid, generator)
        if mask.shape != valid.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != patch grid {tuple(valid.shape)}")
        if bool((mask & ~valid).any()):
            raise ValueError("mask selects padding patches")
        out = encoder(feats, lengths, mask=mask)
        hidden = out.hidden_states[-1][:, encoder.num_prefix_tokens:]  # (B, N, D), final-normed
        index, sel = gather_masked(mask)  # (B, M)
        h = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, M, D)
        x = torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))  # (B, M, K)
        nce, acc = infonce(self.disc_head(h), x, sel)
        mse = masked_mse(self.gen_head(h), x, sel)
        loss = cfg.disc_weight * nce + cfg.gen_weight * mse
        # Chance retrieval: a clip with M_b masked patches is right 1 time in M_b, so over all
        # masked patches sum_b M_b (1 / M_b) / sum_b M_b = (clips with a mask) / (masked patches).
        chance = sel.any(1).sum().float() / sel.sum().clamp(min=1).float()
        metrics = {"infonce": nce.detach(), "mse": mse.detach(), "acc": acc.detach(),
                   "chance_acc": chance.detach(),
                   "masked_frac": (mask.sum() / valid.sum().clamp(min=1)).detach()}
        return ObjectiveOutput(loss=loss, metrics=metrics, extras={"mask": mask})
