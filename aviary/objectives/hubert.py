"""HuBERT-style masked prediction of offline cluster targets.

Hsu et al., "HuBERT: Self-Supervised Speech Representation Learning by Masked Prediction of
Hidden Units" (TASLP 2021), section III:

* targets: k-means cluster ids of a feature stream, computed once before training
  (iteration 0: MFCC, K = 100; iteration 1: a layer of the iteration-0 model, K = 500);
  aviary writes them with ``aviary targets kmeans`` (:mod:`aviary.train.targets`) at the
  encoder's frame rate, and the batch carries them as ``targets`` (B, T') (-100 = none);
* masking: spans of the encoder input (p = 8 % of the frames start a 10-frame span at 20 ms)
  are replaced by a learned mask embedding (wav2vec 2.0's masking);
* loss (Eq. 2-3, alpha = 1: masked frames only): the last layer's output ``o_t`` is
  projected by ``A`` and compared with an embedding ``e_c`` per cluster by cosine similarity
  over a temperature tau = 0.1:

      p(c | X~, t) = exp(cos(A o_t, e_c) / tau) / sum_c' exp(cos(A o_t, e_c') / tau)

  and the loss is the cross-entropy of the true cluster on the masked frames.

The mask embedding lives in the stacked input space (D x R), where masking happens in aviary
(before the encoder's input projection), so the objective holds it with its head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import check, check_range
from aviary.lengths import padding_mask
from aviary.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput
from aviary.objectives.bestrq import FrameUpstream, draw_mask, encoder_input

#: Label of frames without a target (CE ignores them).
IGNORE = -100


@dataclass(frozen=True)
class HubertConfig(ObjectiveConfig):
    """Head, masking and loss settings of HuBERT-style training (defaults: the paper's BASE).

    Attributes:
        num_clusters: K, clusters of the targets (100 for MFCC targets, 500 later); must
            equal the targets' (checked when training starts).
        proj_dim: width of the projection ``A`` and of the cluster embeddings (paper: 256).
        temperature: tau of the cosine logits (paper: 0.1).
        mask_prob, span: every encoder frame starts a ``span``-frame span with probability
            ``mask_prob`` (paper: p = 0.08 and 10 frames at 20 ms; about half of the frames end
            up masked).
        mfcc_normalize: how this preset's iteration-0 MFCC targets are made by
            :func:`aviary.train.targets.with_mfcc_targets` (the demo, the benchmarks):
            ``"none"`` (the paper / fairseq) or ``"utterance"`` (per-utterance CMVN before
            k-means; see ``KMeansTargetsConfig.normalize``). ``aviary targets kmeans`` takes it
            as ``--normalize``. Not used by training itself.
        targets: the targets directory (``aviary targets kmeans --out DIR``), set by
            ``aviary pretrain --targets DIR``; the training data then carries them
            (:mod:`aviary.train.targets`). Empty in presets.
        targets_sha256: fingerprint of the targets trained on (their ``targets.json``), set
            when training starts, so a checkpoint names exactly the targets it learnt.
    """

    name: str = "hubert"
    num_clusters: int = 100
    proj_dim: int = 256
    temperature: float = 0.1
    mask_prob: float = 0.08
    span: int = 10
    mfcc_normalize: str = "none"
    targets: str = ""
    targets_sha256: str = ""

    def validate(self) -> None:
        check_range("num_clusters", self.num_clusters, 2)
        check_range("proj_dim", self.proj_dim, 1)
        check_range("temperature", self.temperature, 0.0, lo_open=True)
        check_range("mask_prob", self.mask_prob, 0.0, 1.0, lo_open=True)
        check_range("span", self.span, 1)
        check(self.mfcc_normalize in ("none", "utterance"), "mfcc_normalize", self.mfcc_normalize,
              "'none' or 'utterance'")

    def build(self, upstream: FrameUpstream) -> "Hubert":
        return Hubert(self, upstream.frontend.dim * upstream.encoder.downsample, upstream.hidden_size)


def cosine_cluster_loss(projected: torch.Tensor, cluster_emb: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor, temperature: float) -> ObjectiveOutput:
    """HuBERT's masked prediction loss (Eq. 2-3 with alpha = 1).

    Args:
        projected: (B, T, d) ``A o_t``.
        cluster_emb: (K, d) cluster embeddings ``e_c``.
        targets: (B, T) long cluster ids, :data:`IGNORE` where there is none.
        mask: (B, T) bool, masked frames (only those with a target are scored).
        temperature: tau.

    Returns:
        :class:`ObjectiveOutput` with ``loss`` and metrics ``ce``, ``acc``, ``unigram_ce``
        (entropy of the scored targets' histogram in this batch: the loss of a predictor that
        ignores the audio; a model at that level has not learned) and ``masked_frames``.
    """
    score = mask & (targets != IGNORE)
    o = projected[score].float()  # (M, d)
    t = targets[score]  # (M,)
    K = cluster_emb.shape[0]
    if t.numel() == 0:
        zero = projected.sum() * 0.0 + cluster_emb.sum() * 0.0
        return ObjectiveOutput(loss=zero, metrics={"ce": 0.0, "acc": 0.0, "unigram_ce": 0.0, "masked_frames": 0})
    logits = F.normalize(o, dim=-1) @ F.normalize(cluster_emb.float(), dim=-1).T / temperature  # (M, K)
    loss = F.cross_entropy(logits, t)
    with torch.no_grad():
        acc = (logits.argmax(-1) == t).float().mean()
        p = torch.bincount(t, minlength=K).double() / t.numel()
        unigram = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return ObjectiveOutput(loss=loss, metrics={"ce": loss.detach(), "acc": acc, "unigram_ce": float(unigram),
                                               "masked_frames": int(t.numel())})


def align_targets(targets: torch.Tensor, lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Targets of a batch cut or padded to the encoder's T frames; :data:`IGNORE` past ``lengths``.

    Args:
        targets: (B, T_t) long frame targets at the encoder rate, starting at the crop's first
            encoder frame (a few frames more or fewer than the encoder has, at the end).
        lengths: (B,) valid encoder frames.
        T: padded encoder length.

    Returns:
        (B, T) long.
    """
    if targets.dim() != 2 or targets.shape[0] != lengths.shape[0]:
        raise ValueError(f"targets must be (B={lengths.shape[0]}, T), got shape {tuple(targets.shape)}")
    Tt = targets.shape[1]
    out = F.pad(targets, (0, max(0, T - Tt)), value=IGNORE)[:, :T] if Tt != T else targets
    return out.masked_fill(padding_mask(lengths, T), IGNORE)


class Hubert(Objective):
    """HuBERT-style targets as a module: mask embedding, projection ``A``, cluster embeddings.

    ``forward(upstream, batch)`` needs a batch with ``targets`` (B, T_t) at the encoder frame
    rate (see :func:`align_targets`).

    Args:
        cfg: objective settings.
        input_dim: stacked input frame's dimension (front-end dim x R).
        hidden_size: the encoder's width H.
    """

    def __init__(self, cfg: HubertConfig, input_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.mask_embedding = nn.Parameter(torch.empty(input_dim).uniform_())  # wav2vec 2.0 / fairseq init
        self.proj = nn.Linear(hidden_size, cfg.proj_dim)
        self.cluster_emb = nn.Parameter(torch.empty(cfg.num_clusters, cfg.proj_dim).uniform_())

    def forward(self, upstream: FrameUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One masked-prediction step.

        Args:
            upstream: see :class:`~aviary.objectives.bestrq.FrameUpstream`.
            batch: ``wavs`` (B, N), ``wav_lengths`` (B,), ``targets`` (B, T_t) long, optionally
                ``mask`` (B, T') bool (pins the masked frames).
            generator: seeds the mask draw (default: the global RNG).

        Returns:
            :class:`ObjectiveOutput` (see :func:`cosine_cluster_loss`); ``extras`` hold the
            aligned ``targets`` and the ``mask``.
        """
        if "targets" not in batch:
            raise ValueError("a HuBERT batch needs 'targets' (frame cluster ids): train with "
                             "`aviary pretrain --targets DIR` (made by `aviary targets kmeans`)")
        stacked, slen = encoder_input(upstream, batch)  # (B, T', D*R)
        T = stacked.shape[1]
        targets = align_targets(batch["targets"].to(slen.device).long(), slen, T)
        mask = draw_mask(batch, slen, T, self.config.mask_prob, self.config.span, generator)
        inputs = torch.where(mask[..., None], self.mask_embedding.to(stacked.dtype), stacked)
        hidden_states, _ = upstream.encoder.encode(inputs, slen)
        out = cosine_cluster_loss(self.proj(hidden_states[-1]), self.cluster_emb, targets, mask,
                                  self.config.temperature)
        out.metrics["masked_frac"] = float(mask.sum()) / max(1, int(slen.sum()))
        out.extras.update(targets=targets, mask=mask)
        return out
