"""Losses, metrics and schedules of vector quantisers (vq-wav2vec, Baevski et al. 2020).

Where things live: the quantiser *modules* (Gumbel-softmax and k-means, with their
codebooks) are part of the model, in :mod:`aviary.models.vqwav2vec`, because an upstream
needs them at inference time to produce tokens and quantised features, and models know
nothing of objectives. This module holds what only training needs:

* :func:`gumbel_temperature`: the temperature schedule, a pure function of progress;
* :func:`kmeans_loss`: the k-means codebook + commitment loss (paper Eq. 3);
* :func:`codebook_metrics`: perplexity per group and codeword usage (diagnose collapse);
* :func:`diversity_loss`: optional penalty on the softmax's average distribution (off
  by default, as in the paper and fairseq's vq-wav2vec recipe, whose model code can add
  it; wav2vec 2.0 uses it with weight 0.1). On the CPU preset it spreads the codes by
  flattening the logits, which turns training samples into noise (see ``GumbelQuantizer``).
"""
from __future__ import annotations

import torch


def gumbel_temperature(progress: float, start: float = 2.0, end: float = 0.5,
                       anneal_fraction: float = 0.7) -> float:
    """Gumbel-softmax temperature at a point of training.

    The paper anneals the temperature linearly from 2 to 0.5 over the first 70 % of the
    updates and keeps it at 0.5 afterwards. (fairseq's reference code decays it
    exponentially per update instead; the end points are the same.)

    Args:
        progress: fraction of training done, ``step / total_steps`` (clamped to [0, 1]).
        start: temperature at progress 0.
        end: temperature from ``anneal_fraction`` on.
        anneal_fraction: fraction of training over which to anneal (0 = always ``end``).

    Returns:
        The temperature (a float).
    """
    p = min(max(float(progress), 0.0), 1.0)
    if anneal_fraction <= 0.0 or p >= anneal_fraction:
        return float(end)
    return float(start + (end - start) * p / anneal_fraction)


def kmeans_loss(z: torch.Tensor, codewords: torch.Tensor, valid: torch.Tensor,
                gamma: float = 0.25) -> torch.Tensor:
    """k-means quantiser loss ``||sg(z) - e||^2 + gamma * ||z - sg(e)||^2`` (paper Eq. 3).

    The first term moves the chosen codewords towards the encoder outputs (the codebook
    gets no gradient through the straight-through estimator); the second, the commitment
    term, keeps the encoder output close to its codeword.

    Args:
        z: (B, T, G, d) encoder outputs before quantisation, per group.
        codewords: (B, T, G, d) the chosen codewords ``e``.
        valid: (B, T) bool, True on real (non-padding) frames.
        gamma: weight of the commitment term (0.25 in the paper).

    Returns:
        Scalar: mean squared error over valid frames and all dimensions.
    """
    if z.shape != codewords.shape:
        raise ValueError(f"z {tuple(z.shape)} and codewords {tuple(codewords.shape)} differ in shape")
    w = valid.to(z.dtype)[..., None, None]  # (B, T, 1, 1)
    denom = (w.sum() * z.shape[-2] * z.shape[-1]).clamp(min=1.0)
    codebook = (((z.detach() - codewords) ** 2) * w).sum() / denom
    commit = (((z - codewords.detach()) ** 2) * w).sum() / denom
    return codebook + gamma * commit


def codebook_metrics(indices: torch.Tensor, valid: torch.Tensor, num_vars: int) -> dict[str, torch.Tensor]:
    """Perplexity of the chosen codewords per group, and the fraction of codewords used.

    Perplexity ``exp(H(p))`` of the empirical distribution of chosen entries over the valid
    frames of the batch: 1 when every frame picks the same codeword (collapse), ``num_vars``
    when all are used equally.

    Args:
        indices: (B, T, G) chosen entry per group.
        valid: (B, T) bool.
        num_vars: V, entries per group.

    Returns:
        ``{"perplexity_g<g>": ..., "perplexity": mean over groups, "code_usage": fraction of
        the G * V entries chosen at least once}`` as detached 0-d tensors.
    """
    g = indices.shape[-1]
    idx = indices[valid]  # (N, G)
    out: dict[str, torch.Tensor] = {}
    if idx.numel() == 0:
        zero = torch.zeros((), device=indices.device)
        return {**{f"perplexity_g{i}": zero for i in range(g)}, "perplexity": zero, "code_usage": zero}
    # One bincount over all groups: offset group i's indices by i * V.
    offs = torch.arange(g, device=idx.device) * num_vars
    counts = torch.bincount((idx + offs).reshape(-1), minlength=g * num_vars).view(g, num_vars).float()
    p = counts / counts.sum(-1, keepdim=True)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # (G,)
    ppl = torch.exp(ent)
    for i in range(g):
        out[f"perplexity_g{i}"] = ppl[i].detach()
    out["perplexity"] = ppl.mean().detach()
    out["code_usage"] = (counts > 0).float().mean().detach()
    return out


def diversity_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(V - perplexity of the mean softmax) / V`` averaged over groups (wav2vec 2.0 style).

    Args:
        logits: (B, T, G, V) Gumbel quantiser logits.
        valid: (B, T) bool.

    Returns:
        Scalar in [0, 1): 0 when the average distribution is uniform over the V entries.
    """
    v = logits.shape[-1]
    probs = torch.softmax(logits[valid].float(), dim=-1)  # (N, G, V)
    if probs.shape[0] == 0:
        return logits.sum() * 0.0
    avg = probs.mean(0)  # (G, V)
    ppl = torch.exp(-(avg * torch.log(avg.clamp(min=1e-7))).sum(-1))  # (G,)
    return ((v - ppl) / v).mean()

