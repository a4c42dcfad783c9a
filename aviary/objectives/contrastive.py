"""Future-frame prediction with sampled negatives (wav2vec / vq-wav2vec).

The context network's output ``c_t`` predicts, through a step-specific affine map
``h_k``, the quantised frame ``z_{t+k}`` for ``k = 1..K`` (vq-wav2vec paper, Eq. 1):

    L_k = - sum_t [ log sigmoid(z_{t+k}^T h_k(c_t)) + sum_{n} log sigmoid(-z~_n^T h_k(c_t)) ]

with negatives ``z~`` drawn uniformly from the same utterance. The loss is the binary
cross-entropy summed over positives and negatives, divided by the number of positives
(fairseq's ``wav2vec`` criterion normalises the same way).

Both parts are free functions: :func:`sample_negatives` is pure and seeded (pass a
``torch.Generator``), so the negatives of a test or a debugging session can be repeated
or passed in by hand.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.lengths import valid_mask
from aviary.objectives.base import Objective, ObjectiveOutput
from aviary.objectives.quantize import codebook_metrics, diversity_loss, gumbel_temperature, kmeans_loss


def sample_negatives(lengths: torch.Tensor, max_len: int, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of negatives for every frame, drawn uniformly from the same utterance.

    For frame ``t`` of utterance ``b`` the ``num_negatives`` indices lie in ``[0, lengths[b])``
    (never padding) and are never ``t`` itself (never the positive): draw ``r`` uniformly in
    ``[0, len - 1)`` and skip over ``t`` (``r + (r >= t)``), which keeps the draw uniform over
    the ``len - 1`` other frames. Negatives may repeat (sampling with replacement, as in fairseq).
    Rows for padding frames (``t >= lengths[b]``) hold valid indices too, but are meaningless.

    Args:
        lengths: (B,) valid frames per utterance; every length must be >= 2.
        max_len: T, the padded number of frames.
        num_negatives: N negatives per frame.
        generator: optional seeded generator (on the device of ``lengths``).

    Returns:
        (B, T, N) long indices into the time axis.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be (B,), got shape {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 2:
        raise ValueError(f"every utterance needs >= 2 frames to draw negatives, got lengths {lengths.tolist()}")
    if lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(f"lengths max {int(lengths.max())} > max_len {max_len}")
    b = lengths.shape[0]
    dev = lengths.device
    u = torch.rand((b, max_len, num_negatives), generator=generator, device=dev)  # (B, T, N)
    # r uniform in {0, .., len-2}; floor(u * (len-1)) with u < 1.
    r = (u * (lengths - 1).view(b, 1, 1).to(u.dtype)).long()
    r = torch.minimum(r, (lengths - 2).view(b, 1, 1))
    t = torch.arange(max_len, device=dev).view(1, max_len, 1)
    # Padding frames: compare against a clamped t so their indices stay inside the utterance.
    t = torch.minimum(t, (lengths - 1).view(b, 1, 1))
    return r + (r >= t).long()


def future_prediction_loss(predictions: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                           negatives: torch.Tensor, offset: int = 1, logit_bias: torch.Tensor | float = 0.0
                           ) -> ObjectiveOutput:
    """Binary cross-entropy of K-step future prediction against sampled negatives.

    Step ``k`` (0-based) compares ``predictions[:, t, k]`` with the target ``z_{t+k+offset}``
    (positive) and with the negatives drawn for that target frame,
    ``targets[b, negatives[b, t+k+offset, n]]``. Only pairs where the target frame is a real
    frame count.

    Args:
        predictions: (B, T, K, D) ``h_k(c_t)`` for every frame and step.
        targets: (B, T, D) quantised frames ``z``.
        lengths: (B,) valid frames.
        negatives: (B, T, N) indices from :func:`sample_negatives`.
        offset: how far ahead step 0 predicts (1 in the paper: ``z_{t+1}``).
        logit_bias: scalar added to every logit (0 in the paper's Eq. 1); a model may start it
            at the prior log-odds ``log(1 / N)`` so that early gradients have no part shared by
            all targets (see :class:`FuturePrediction`).

    Returns:
        :class:`ObjectiveOutput`: ``loss`` the summed BCE divided by the number of positives; ``metrics``
        ``accuracy`` (fraction of predictions whose positive scores above every negative),
        ``num_positives``, ``pos_logit`` and ``neg_logit`` (mean scores).
    """
    b, t_max, k_steps, d = predictions.shape
    if targets.shape != (b, t_max, d):
        raise ValueError(f"targets must be {(b, t_max, d)} to match predictions {tuple(predictions.shape)}, "
                         f"got {tuple(targets.shape)}")
    if negatives.shape[:2] != (b, t_max):
        raise ValueError(f"negatives must be ({b}, {t_max}, N), got {tuple(negatives.shape)}")
    n_neg = negatives.shape[-1]
    # Candidates for every target frame: the positive first, then its negatives.
    neg_feats = _gather_time(targets, negatives)  # (B, T, N, D)
    cands = torch.cat([targets.unsqueeze(2), neg_feats], dim=2)  # (B, T, 1+N, D)
    labels = torch.zeros(1 + n_neg, device=targets.device, dtype=predictions.dtype)
    labels[0] = 1.0
    total = predictions.new_zeros(())
    n_pos = predictions.new_zeros(())
    correct = predictions.new_zeros(())
    pos_sum = predictions.new_zeros(())
    neg_sum = predictions.new_zeros(())
    for k in range(k_steps):
        shift = k + offset
        if shift >= t_max:
            break
        pred = predictions[:, : t_max - shift, k]  # (B, T-s, D)
        cand = cands[:, shift:]  # (B, T-s, 1+N, D)
        logits = torch.einsum("btd,btnd->btn", pred, cand) + logit_bias  # (B, T-s, 1+N)
        # Valid where the target frame t + shift is a real frame.
        valid = valid_mask(lengths - shift, t_max - shift).to(logits.dtype)  # (B, T-s)
        bce = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="none")
        total = total + (bce.sum(-1) * valid).sum()
        n_pos = n_pos + valid.sum()
        with torch.no_grad():
            hit = (logits[..., 0:1] > logits[..., 1:]).all(-1).to(logits.dtype)
            correct = correct + (hit * valid).sum()
            pos_sum = pos_sum + (logits[..., 0] * valid).sum()
            neg_sum = neg_sum + (logits[..., 1:].mean(-1) * valid).sum()
    denom = n_pos.clamp(min=1.0)
    loss = total / denom
    metrics = {"accuracy": (correct / denom).detach(), "num_positives": n_pos.detach(),
               "pos_logit": (pos_sum / denom).detach(), "neg_logit": (neg_sum / denom).detach()}
    return ObjectiveOutput(loss=loss, metrics=metrics)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, t, n] = x[b, index[b, t, n]]`` for x (B, T, D), index (B, T, N) -> (B, T, N, D)."""
    b, t, n = index.shape
    flat = index.reshape(b, t * n)  # (B, T*N)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(b, t * n, x.shape[-1]))  # (B, T*N, D)
    return out.view(b, t, n, x.shape[-1])


class QuantizedUpstream(Protocol):
    """What :class:`FuturePrediction` needs from an upstream (``aviary.models.vqwav2vec.VqWav2VecUpstream``):
    ``encode`` -> (z (B, T, C), frames (B,), valid (B, T)); a ``quantizer`` returning an object
    with ``quantized``, ``indices``, ``logits``, ``z``, ``codewords``, ``restarted`` (and a
    ``temperature`` when it samples); an ``aggregator`` (B, C, T) -> list of layer outputs."""

    quantizer: Any
    aggregator: Any

    def encode(self, wavs: torch.Tensor, wav_lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class FuturePrediction(Objective):
    """vq-wav2vec's objective: step-specific predictors ``h_k`` of future quantised frames,
    plus the quantiser's own losses (k-means Eq. 3, optional Gumbel diversity).

    Args:
        cfg: the vq-wav2vec config (reads ``channels``, ``prediction_steps``,
            ``prediction_offset``, ``num_negatives``, ``prior_logit_bias``, ``num_vars``, the
            temperature schedule, ``kmeans_gamma`` / ``kmeans_weight``, ``diversity_weight``,
            ``receptive_field`` / ``stride`` for the error message).

    ``prior_logit_bias`` (issue 7): with N negatives per positive, the binary cross-entropy
    of a predictor that cannot yet tell them apart is lowest at ``sigmoid(logit) = 1 / (N+1)``,
    logit ``log(1 / N)`` (loss 3.35 for N = 10). A default-initialised predictor starts with
    logits far from there (loss ~19), and while it moves them, the gradient on the targets
    ``z`` has a large component shared by all frames (about ``(N - 1) / 2`` negatives' worth
    pushing every ``z`` along ``-h``). Through the straight-through estimator that shared
    push makes every frame pick the same codeword: positives then equal negatives and
    the loss is stuck at the 3.35 floor (a 300-step run: perplexity 286 -> 1.3). Starting the
    logits at the prior odds (a learnable scalar bias, the usual initialisation of a rare-class
    logit) with ``h_k = 0`` makes the first gradient on the predictor
    ``-(N / (N+1)) (z_pos - mean z_neg) c^T``, with no shared part, and on the targets zero.

    ``forward`` reads ``wavs`` (B, N), ``wav_lengths`` (B,) and optionally ``negatives``
    (B, T, N) indices (else drawn from ``generator``); extras ``indices`` (codes), ``lengths``,
    ``negatives``.
    """

    # Checkpoints of vq-wav2vec keep ``predictor.*`` and ``logit_bias`` at the top level.
    state_prefix = ""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        # K affine maps h_k, one Linear producing all of them (fairseq: ConvTranspose2d (1, K)).
        self.predictor = nn.Linear(cfg.channels, cfg.channels * cfg.prediction_steps)
        self.logit_bias: nn.Parameter | None = None
        if cfg.prior_logit_bias:
            nn.init.zeros_(self.predictor.weight)
            nn.init.zeros_(self.predictor.bias)
            self.logit_bias = nn.Parameter(torch.tensor(math.log(1.0 / cfg.num_negatives)))
        self.temperature = gumbel_temperature(0.0, cfg.temp_start, cfg.temp_end, cfg.temp_anneal_fraction)

    def set_progress(self, upstream: QuantizedUpstream, step: int, total_steps: int) -> None:
        """Anneal the Gumbel temperature (a pure function of step / total_steps)."""
        cfg = self.config
        self.temperature = gumbel_temperature(step / max(total_steps, 1), cfg.temp_start, cfg.temp_end,
                                              cfg.temp_anneal_fraction)
        if hasattr(upstream.quantizer, "temperature"):
            upstream.quantizer.temperature = self.temperature

    def forward(self, upstream: QuantizedUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        cfg = self.config
        z, lens, valid = upstream.encode(batch["wavs"], batch["wav_lengths"])  # (B, T, C)
        qo = upstream.quantizer(z, valid)
        c = upstream.aggregator(qo.quantized.transpose(1, 2), valid)[-1].transpose(1, 2)  # (B, T, C)
        b, t, ch = c.shape
        preds = self.predictor(c).view(b, t, cfg.prediction_steps, ch)  # (B, T, K, C)
        negs = batch.get("negatives")
        if negs is None:
            if t < 2:
                raise ValueError(f"vq-wav2vec needs utterances of >= 2 frames ({cfg.receptive_field + cfg.stride} "
                                 f"samples); the longest in this batch has {t} (wav lengths "
                                 f"{batch['wav_lengths'].tolist()}); raise train.min_seconds")
            # Rows under 2 frames have no positive (t + k >= length), so their negatives are
            # never used; clamping only keeps the sampler's precondition.
            negs = sample_negatives(lens.clamp(min=2), t, cfg.num_negatives, generator)
        bias = self.logit_bias if self.logit_bias is not None else 0.0
        pred = future_prediction_loss(preds, qo.quantized, lens, negs, cfg.prediction_offset, logit_bias=bias)
        loss = pred.loss
        metrics = {"prediction_loss": pred.loss.detach(), **pred.metrics,
                   **codebook_metrics(qo.indices, valid, cfg.num_vars)}
        if qo.z is not None:
            km = kmeans_loss(qo.z, qo.codewords, valid, cfg.kmeans_gamma)
            loss = loss + cfg.kmeans_weight * km
            metrics["kmeans_loss"] = km.detach()
        if qo.restarted is not None:
            metrics["restarted_codes"] = qo.restarted.float()
        if qo.logits is not None:
            metrics["temperature"] = torch.tensor(self.temperature)
            if cfg.diversity_weight > 0:
                div = diversity_loss(qo.logits, valid)
                loss = loss + cfg.diversity_weight * div
                metrics["diversity_loss"] = div.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics,
                               extras={"indices": qo.indices.detach(), "lengths": lens, "negatives": negs})
