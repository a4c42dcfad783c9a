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

import torch
import torch.nn.functional as F


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
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
            all targets (see ``VqWav2VecPretraining``).

    Returns:
        (loss, metrics): the summed BCE divided by the number of positives; metrics
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
    frames = torch.arange(t_max, device=targets.device)
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
        valid = (frames[shift:].unsqueeze(0) < lengths.unsqueeze(1)).to(logits.dtype)  # (B, T-s)
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
    return loss, metrics


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, t, n] = x[b, index[b, t, n]]`` for x (B, T, D), index (B, T, N) -> (B, T, N, D)."""
    b, t, n = index.shape
    flat = index.reshape(b, t * n)  # (B, T*N)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(b, t * n, x.shape[-1]))  # (B, T*N, D)
    return out.view(b, t, n, x.shape[-1])
