"""How similar are the attention maps of different layers? (Audio ALBERT, Chi et al. 2021, section 4.3)

The AALBERT paper compares every pair of layers by the Jensen-Shannon divergence between
their attention distributions: for a query position t of head k, layer i attends with the
distribution ``P_i[k, t, :]`` over key positions, and

    JSD(P || Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),   M = (P + Q) / 2

with logarithms in base 2, so that JSD lies in [0, 1] (0: identical, 1: disjoint supports).
The divergence is computed per head and per query position, then averaged over heads,
utterances and every valid (non-padding) query position, giving an L x L matrix per model.
Shared-layer models (AALBERT) show small divergences between consecutive layers; unshared
ones (Mockingjay) larger ones.

Computation uses the entropy form ``JSD(P, Q) = H(M) - (H(P) + H(Q)) / 2`` (equivalent,
and it lets every layer's entropy be computed once instead of once per pair). Padding keys
carry zero probability and add nothing (``0 log 0 = 0``); padding queries are excluded from
the average.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from aviary.lengths import valid_mask

log = logging.getLogger(__name__)

_LOG2 = math.log(2.0)


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along ``dim`` (``0 log 0 = 0``).

    Args:
        p: probabilities (any shape), summing to 1 along ``dim``.
        dim: the distribution axis.

    Returns:
        ``p`` with ``dim`` reduced.
    """
    return -torch.special.xlogy(p, p).sum(dim) / _LOG2


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (in [0, 1]) between distributions along ``dim``.

    Args:
        p, q: probabilities of the same shape, each summing to 1 along ``dim``.
        dim: the distribution axis.

    Returns:
        The divergence with ``dim`` reduced, clamped at 0 against rounding.
    """
    if p.shape != q.shape:
        raise ValueError(f"JSD needs distributions of the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    p = p.double()
    q = q.double()
    jsd = entropy_bits((p + q) / 2, dim) - (entropy_bits(p, dim) + entropy_bits(q, dim)) / 2
    return jsd.clamp(min=0.0)


@dataclass
class JSDResult:
    """Layer-by-layer attention divergences of one model.

    Attributes:
        matrix: (L, L) JSD averaged over heads, utterances and valid query positions.
        per_head: (h, L, L) the same, per head index (head k of layer i vs head k of layer j).
        num_queries: valid query positions averaged over (per head).
        num_utterances: utterances seen.
    """

    matrix: np.ndarray
    per_head: np.ndarray
    num_queries: int
    num_utterances: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.matrix.shape[0])

    def adjacent_mean(self) -> float:
        """Mean JSD between consecutive layers (i, i + 1): how fast attention changes with depth."""
        L = self.num_layers
        if L < 2:
            return float("nan")
        return float(np.mean([self.matrix[i, i + 1] for i in range(L - 1)]))

    def off_diagonal_mean(self) -> float:
        """Mean JSD over all pairs of distinct layers."""
        L = self.num_layers
        if L < 2:
            return float("nan")
        return float(self.matrix[~np.eye(L, dtype=bool)].mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "matrix": np.round(self.matrix, 6).tolist(),
            "per_head": np.round(self.per_head, 6).tolist(),
            "num_layers": self.num_layers,
            "num_heads": int(self.per_head.shape[0]),
            "num_queries": self.num_queries,
            "num_utterances": self.num_utterances,
            "adjacent_mean": round(self.adjacent_mean(), 6),
            "off_diagonal_mean": round(self.off_diagonal_mean(), 6),
            **self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JSDResult":
        meta = {k: v for k, v in d.items() if k not in (
            "matrix", "per_head", "num_layers", "num_heads", "num_queries", "num_utterances",
            "adjacent_mean", "off_diagonal_mean")}
        return cls(matrix=np.asarray(d["matrix"], dtype=np.float64),
                   per_head=np.asarray(d["per_head"], dtype=np.float64),
                   num_queries=int(d["num_queries"]), num_utterances=int(d["num_utterances"]), meta=meta)


class LayerJSDAccumulator:
    """Running sums of per-head, per-query layer-pair JSD over batches of attention maps.

    Feed it the attention probabilities of every layer for batch after batch
    (:meth:`update`), then read the averages (:meth:`result`).
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None  # (h, L, L) float64
        self._queries = 0
        self._utterances = 0

    def update(self, attentions: Sequence[torch.Tensor], lengths: torch.Tensor) -> None:
        """Add one batch.

        Args:
            attentions: L tensors (B, h, T, T) of attention probabilities (query axis -2,
                key axis -1), one per layer, all the same shape.
            lengths: (B,) valid positions per row; queries at ``t >= lengths[b]`` are
                excluded and keys there are zeroed (they carry no probability mass under a
                key-padding mask anyway).
        """
        if len(attentions) == 0:
            raise ValueError("no attention maps given (the model returned none: need_weights?)")
        shape = tuple(attentions[0].shape)
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"attention maps must be (B, h, T, T), got {shape}")
        for i, a in enumerate(attentions):
            if tuple(a.shape) != shape:
                raise ValueError(f"attention map of layer {i} has shape {tuple(a.shape)}, layer 0 has {shape}")
        B, h, T, _ = shape
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=attentions[0].device)
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be ({B},), got {tuple(lengths.shape)}")
        if int(lengths.max()) > T or int(lengths.min()) < 1:
            raise ValueError(f"lengths {lengths.tolist()} must lie in [1, T={T}]")
        valid = valid_mask(lengths, T)  # (B, T)
        key_keep = valid[:, None, None, :].double()  # (B, 1, 1, T)
        query_w = valid[:, None, :].double()  # (B, 1, T): weight of each query position
        L = len(attentions)
        probs = [a.double() * key_keep for a in attentions]  # (B, h, T, T) each
        ent = [entropy_bits(p) for p in probs]  # (B, h, T) each
        total = torch.zeros(h, L, L, dtype=torch.float64)
        for i in range(L):
            for j in range(i + 1, L):
                jsd = (entropy_bits((probs[i] + probs[j]) / 2) - (ent[i] + ent[j]) / 2).clamp(min=0.0)  # (B, h, T)
                s = (jsd * query_w).sum(dim=(0, 2)).cpu()  # (h,)
                total[:, i, j] = s
                total[:, j, i] = s
        self._sum = total if self._sum is None else self._add(total)
        self._queries += int(lengths.sum())
        self._utterances += B

    def _add(self, total: torch.Tensor) -> torch.Tensor:
        assert self._sum is not None
        if self._sum.shape != total.shape:
            raise ValueError(f"batch has (heads, layers, layers) = {tuple(total.shape)}, "
                             f"earlier batches {tuple(self._sum.shape)}")
        return self._sum + total

    def result(self, **meta: Any) -> JSDResult:
        """Averages so far (``meta`` is stored alongside, e.g. the model name)."""
        if self._sum is None or self._queries == 0:
            raise ValueError("no attention maps accumulated yet")
        per_head = (self._sum / self._queries).numpy()  # (h, L, L)
        return JSDResult(matrix=per_head.mean(axis=0), per_head=per_head, num_queries=self._queries,
                         num_utterances=self._utterances, meta=dict(meta))


def layer_jsd(attentions: Sequence[torch.Tensor], lengths: torch.Tensor) -> JSDResult:
    """JSD matrix of one batch of attention maps (see :class:`LayerJSDAccumulator`)."""
    acc = LayerJSDAccumulator()
    acc.update(attentions, lengths)
    return acc.result()


def extract_attentions(upstream: torch.nn.Module, wavs: torch.Tensor, wav_lengths: torch.Tensor
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's attention probabilities from an upstream that can return them.

    Args:
        upstream: an :class:`~aviary.models.upstream.Upstream` that implements
            ``attentions`` (the MAM family: Mockingjay, AALBERT, TERA).
        wavs: (B, N) waveforms.
        wav_lengths: (B,) valid samples.

    Returns:
        (L attention tensors (B, h, T, T), (B,) valid encoder frames).
    """
    attentions, lengths = upstream.attentions(wavs, wav_lengths)
    if not attentions:
        raise ValueError(f"{type(upstream).__name__} returned no attention maps")
    return list(attentions), lengths


@torch.no_grad()
def attention_jsd(upstream: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  autocast: Callable[[], Any] | None = None, **meta: Any) -> JSDResult:
    """Layer-by-layer attention JSD of ``upstream`` over batches of audio.

    Args:
        upstream: see :func:`extract_attentions`; put in eval mode here (no dropout).
        batches: ``(wavs (B, N), wav_lengths (B,))`` pairs.
        autocast: optional context-manager factory for the forward pass (e.g. bf16 on CPU);
            the divergences themselves are computed in float64 either way.
        **meta: stored in the result (model name, checkpoint).

    Returns:
        The averaged :class:`JSDResult`.
    """
    upstream.eval()
    acc = LayerJSDAccumulator()
    for wavs, wav_lengths in batches:
        if autocast is not None:
            with autocast():
                attentions, lengths = extract_attentions(upstream, wavs, wav_lengths)
        else:
            attentions, lengths = extract_attentions(upstream, wavs, wav_lengths)
        # Softmax under bf16 autocast is computed in fp32 and cast back; renormalise so
        # each row sums to 1 again before taking entropies.
        attentions = [a.float() / a.float().sum(-1, keepdim=True).clamp(min=1e-12) for a in attentions]
        acc.update(attentions, lengths)
    return acc.result(**meta)


def plot_jsd_heatmaps(results: dict[str, JSDResult], path: str, title: str = "Attention JSD between layers") -> str:
    """Side-by-side L x L heatmaps, one per model, on one colour scale (the AALBERT paper's figure).

    Args:
        results: model name -> result.
        path: PNG to write.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no JSD results to plot")
    names = list(results)
    vmax = max(float(r.matrix.max()) for r in results.values())
    vmax = max(vmax, 1e-3)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 0.8, 4.0), squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        m = results[name].matrix
        L = m.shape[0]
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, origin="upper")
        ticks = list(range(L))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}\nadjacent-layer mean {results[name].adjacent_mean():.3f}", fontsize=10)
        if L <= 12:
            for i in range(L):
                for j in range(L):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 * vmax else "black")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="JSD (bits)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)
