"""The vector quantisers of vq-wav2vec (Baevski et al. 2020, Sec. 3.2): Gumbel-softmax and k-means.

Both map encoder frames (B, T, C) to G groups of V codebook entries and return a
:class:`QuantizerOutput`. They are part of the model, not of the objective: an upstream
needs them at inference to produce tokens and quantised features. Their training losses,
metrics and the temperature schedule are in :mod:`aviary.objectives.quantize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from aviary.models.conv import MaskedGroupNorm


@dataclass
class QuantizerOutput:
    """What a quantiser returns (time-first).

    Attributes:
        quantized: (B, T, C) the G chosen codewords concatenated (straight-through in training).
        indices: (B, T, G) chosen entry per group.
        logits: (B, T, G, V) Gumbel logits, else None.
        z: (B, T, G, C/G) k-means: projected encoder output before quantisation, else None.
        codewords: (B, T, G, C/G) k-means: chosen codewords (with codebook gradient), else None.
        restarted: k-means with ``restart_threshold > 0``, in training: 0-d count of the
            codewords restarted after this batch, else None.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor | None = None
    z: torch.Tensor | None = None
    codewords: torch.Tensor | None = None
    restarted: torch.Tensor | None = None


def _update_usage(usage: torch.Tensor, counts: torch.Tensor, momentum: float,
                  threshold: float) -> torch.Tensor | None:
    """Fold one batch into the k-means quantiser's running usage (for dead-code restarts).

    Args:
        usage: (G, V) running share of the frames choosing each entry, updated in place.
        counts: (G, V) this batch's frames per entry (summed over processes under DDP).
        momentum: weight of the old usage.
        threshold: an entry is dead below ``threshold / V``.

    Returns:
        (G, V) bool dead entries, or None (usage unchanged) when a group had no frames.
    """
    total = counts.sum(-1, keepdim=True)  # (G, 1)
    if float(total.min()) == 0:
        return None
    usage.mul_(momentum).add_((1 - momentum) * counts / total)
    return usage < threshold / usage.shape[-1]


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantiser (paper Sec. 3.2.1).

    ``logits = MLP(x)`` (C -> hidden -> G*V); in training a hard one-hot sample of
    ``gumbel_softmax(logits, tau)`` picks the codeword with the straight-through estimator
    (forward: the hard one-hot, backward: the soft sample's gradient); at inference the
    argmax. Set ``temperature`` from the schedule (:func:`~aviary.objectives.quantize.gumbel_temperature`).

    Two choices keep the first codes informative (issue 7; without them a short run
    collapses onto one codeword per group, where positives equal negatives and the
    prediction loss sits at its "all negative" floor):

    * The last layer starts with N(0, 1) weights and zero bias, as fairseq initialises its
      logit projection: the logits then spread over several units, more than the Gumbel
      noise at temperature 2 (std ~2.6), so a training code is a (random-projection)
      function of the input. With PyTorch's default init the logits spread ~0.1, the
      hard samples are pure noise and there is nothing for the context network to predict.
    * ``input_norm``: the encoder's log-compressed ReLU features share a large positive
      per-channel offset (frames of one utterance have cosine similarity ~0.8 at init), so
      the argmax of a random projection is the same few entries for every frame (argmax
      perplexity ~3 of 320). Normalising each channel over the utterance's valid frames
      removes that offset and leaves what changes from frame to frame (argmax
      perplexity ~35 at init).

    What these do not prevent (measured on the synthetic corpus, CPU preset, lr 5e-4): within
    ~20 updates the encoder's output settles on about one dominant direction (participation
    ratio of the quantiser input 10.4 -> 1.1-2); the prediction loss alone does this (through
    the targets or through the context network, either path), and an argmax of linear logits
    of a ~1-D input has only a few winners, so the argmax perplexity falls to ~8 of 320 while
    the prediction accuracy rises (~0.24, chance 0.09). The optional ``diversity_weight``
    (wav2vec 2.0's penalty) spreads the codes but is met by flattening the logits: training
    samples become noise and the accuracy stays at chance (weight >= 0.03); at 0.01 it
    changes little. Even with an extra term against flat logits (mutual information between
    frames and codes) the run flips between diverse codes the context network cannot predict
    and the collapsed state.

    Splitting frequent entries into unused ones (the Gumbel analogue of k-means' dead-code
    restarts) was tried and removed: it spread the codes but cost prediction accuracy
    (DEVELOPING.md, "Gumbel entry splitting: measured, removed").

    What does spread the codes is training longer: the same preset and settings over 1,500
    steps (``configs/vq-wav2vec-gumbel-cpu.yaml``) end at accuracy 0.373 and perplexity
    17.6 / 17.4 (7.9 / 11.3 at 300 steps), rising at every validation, and tokenise the corpus
    into 529 pairs with 58 / 51 entries per group in use (145 and 28 / 27 at 300 steps).
    """

    def __init__(self, channels: int, num_groups: int, num_vars: int, hidden: int, shared_codebook: bool = False,
                 input_norm: bool = False):
        super().__init__()
        self.num_groups, self.num_vars = num_groups, num_vars
        self.shared_codebook = shared_codebook
        # Per-channel statistics over valid frames (num_groups = channels).
        self.input_norm = MaskedGroupNorm(channels, channels) if input_norm else None
        self.proj = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, num_groups * num_vars))
        nn.init.normal_(self.proj[-1].weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj[-1].bias)
        # (G or 1, V, C/G); uniform init as fairseq's quantiser.
        self.codebook = nn.Parameter(torch.empty(1 if shared_codebook else num_groups, num_vars, channels // num_groups))
        nn.init.uniform_(self.codebook)
        self.temperature = 2.0

    def hidden(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, hidden): the input of the last logit layer."""
        if self.input_norm is not None:
            x = self.input_norm(x.transpose(1, 2), valid).transpose(1, 2)
        return self.proj[:-1](x)

    def logits(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), valid (B, T) bool or None (all valid) -> (B, T, G, V)."""
        return rearrange(self.proj[-1](self.hidden(x, valid)), "b t (g v) -> b t g v", g=self.num_groups)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        logits = self.logits(x, valid)  # (B, T, G, V)
        if self.training:
            onehot = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=True, dim=-1).to(x.dtype)
        else:
            onehot = F.one_hot(logits.argmax(-1), self.num_vars).to(x.dtype)
        q = torch.einsum("btgv,gvd->btgd", onehot, self.codebook.expand(self.num_groups, -1, -1))
        return QuantizerOutput(quantized=rearrange(q, "b t g d -> b t (g d)"), indices=onehot.argmax(-1),
                               logits=logits)

    def codes(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Inference codes: x (B, T, C), valid (B, T) or None -> (B, T, G) argmax entries."""
        return self.logits(x, valid).argmax(-1)


class KMeansQuantizer(nn.Module):
    """k-means quantiser (paper Sec. 3.2.2).

    The encoder output is first projected per group (1x1 grouped conv + GroupNorm, as in
    fairseq) to ``z``; each group takes the nearest of V codewords by Euclidean distance.
    Straight-through: the forward value is the codeword ``e``, the gradient goes to ``z``
    unchanged (``z + sg(e - z)``); the codebook learns from :func:`~aviary.objectives.quantize.kmeans_loss`.

    ``input_norm``: as for :class:`GumbelQuantizer`, each encoder channel is first normalised
    over the utterance's valid frames. The projection's GroupNorm (G groups) keeps each
    channel's offset, and at init that shared offset decides the nearest codeword for almost
    every frame (argmax perplexity ~5 of 320, ~40 with the input norm).
    ``restart_threshold`` (dead-code restart, issue 7): the codebook starts near the origin
    (``0.01 * N(0, 1)``, as fairseq) while ``z`` has unit variance per element (GroupNorm), and
    Adam moves each codebook element by at most ~lr per update, so in a run of a few hundred
    steps at lr 5e-4 the codewords stay within ~0.15 of the origin. The nearest codeword is then
    ``argmax_v z . e_v`` over fixed random directions, and only the few codewords at the
    extremes of the codebook's projection onto the directions in which ``z`` varies can ever
    win. Those directions shrink fast: the commitment term (alone, with the prediction loss
    cut off from ``z``) and the prediction loss (alone, with ``kmeans_weight = 0``) each pull
    the encoder onto about one dominant direction within 20 updates (participation ratio of
    the quantiser input 10.4 -> 1.5), leaving ~4 codes per group (measured on the synthetic
    corpus, CPU preset). Moving each rarely chosen codeword onto the ``z`` of a random frame
    puts the codebook where the data is, whatever its rank, and usage recovers within ~40
    updates (perplexity ~180 of 320). The running usage is training state only and is not
    saved: a resumed run starts it at "all alive".
    """

    # Weight of the newest batch in the running usage: ~10 batches of memory, so a codeword
    # is only restarted after ~20 updates without being chosen (threshold 0.1 / V).
    usage_momentum = 0.9

    def __init__(self, channels: int, num_groups: int, num_vars: int, input_norm: bool = False,
                 restart_threshold: float = 0.0):
        super().__init__()
        self.num_groups, self.num_vars = num_groups, num_vars
        self.restart_threshold = restart_threshold
        self.input_norm = MaskedGroupNorm(channels, channels) if input_norm else None
        self.proj = nn.Conv1d(channels, channels, 1, groups=num_groups, bias=False)
        self.norm = MaskedGroupNorm(num_groups, channels)
        self.codebook = nn.Parameter(0.01 * torch.randn(num_groups, num_vars, channels // num_groups))  # (G, V, d)
        # (G, V) running share of the frames choosing each codeword (for dead-code restarts).
        self.register_buffer("usage", torch.full((num_groups, num_vars), 1.0 / num_vars), persistent=False)

    def project(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) -> z (B, T, G, d)."""
        x = x.transpose(1, 2)  # (B, C, T)
        if self.input_norm is not None:
            x = self.input_norm(x, valid)
        z = self.norm(self.proj(x), valid)  # (B, C, T)
        return rearrange(z, "b (g d) t -> b t g d", g=self.num_groups)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, T, G, d) -> (B, T, G) index of the nearest codeword per group."""
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 does not change the argmin.
        dots = torch.einsum("btgd,gvd->btgv", z, self.codebook)
        return ((self.codebook ** 2).sum(-1) - 2 * dots).argmin(-1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        z = self.project(x, valid)  # (B, T, G, d)
        idx = self.nearest(z.detach())
        g = torch.arange(self.num_groups, device=x.device).view(1, 1, -1)
        e = self.codebook[g, idx]  # (B, T, G, d)
        q = z + (e - z).detach()  # straight-through
        restarted = None
        if self.training and self.restart_threshold > 0:
            restarted = self.restart_dead_codes(z.detach(), idx, valid)
        return QuantizerOutput(quantized=rearrange(q, "b t g d -> b t (g d)"), indices=idx, z=z, codewords=e,
                               restarted=restarted)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Update the running usage with this batch and move dead codewords onto random frames.

        Called in training after the codewords of this batch were picked (the batch's outputs
        are unchanged; the next batch sees the new codebook). Under ``torch.distributed`` the
        counts are summed over processes and the new codewords come from rank 0, so every
        replica keeps the same codebook.

        Args:
            z: (B, T, G, d) projected encoder outputs (detached).
            indices: (B, T, G) chosen codewords.
            valid: (B, T) bool or None (all valid).

        Returns:
            0-d long tensor: codewords restarted in this call (over all groups).
        """
        g, v = self.num_groups, self.num_vars
        if valid is None:
            valid = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        zv, iv = z[valid], indices[valid]  # (N, G, d), (N, G)
        offs = torch.arange(g, device=z.device) * v
        counts = torch.bincount((iv + offs).reshape(-1), minlength=g * v).view(g, v).to(self.usage.dtype)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
        dead = _update_usage(self.usage, counts, self.usage_momentum, self.restart_threshold)
        if dead is None:
            return torch.zeros((), dtype=torch.long, device=z.device)
        # One candidate frame per entry (drawn even without local frames, so every rank
        # draws the same number of random numbers).
        if zv.shape[0] > 0:
            pick = torch.randint(0, zv.shape[0], (g, v), device=z.device)
            cand = zv[pick, torch.arange(g, device=z.device).unsqueeze(1)]  # (G, V, d)
        else:
            cand = torch.zeros_like(self.codebook)
        if distributed:
            torch.distributed.broadcast(cand, src=0)
        self.codebook.copy_(torch.where(dead.unsqueeze(-1), cand.to(self.codebook.dtype), self.codebook))
        self.usage.masked_fill_(dead, 1.0 / v)
        return dead.sum()

    def codes(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.nearest(self.project(x, valid))


def build_quantizer(cfg: Any) -> GumbelQuantizer | KMeansQuantizer:
    """The quantiser of a :class:`~aviary.models.vqwav2vec.VqWav2VecConfig`."""
    if cfg.quantizer == "gumbel":
        return GumbelQuantizer(cfg.channels, cfg.num_groups, cfg.num_vars, cfg.gumbel_hidden, cfg.shared_codebook,
                               cfg.quantizer_input_norm)
    return KMeansQuantizer(cfg.channels, cfg.num_groups, cfg.num_vars, cfg.quantizer_input_norm,
                           cfg.code_restart_threshold)
