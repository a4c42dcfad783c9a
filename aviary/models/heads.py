"""Pretraining heads on top of an encoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from aviary.models.layers import init_bert_weights


class SpecHead(nn.Module):
    """Mockingjay's spectrogram prediction head.

    ``Linear(H, H) -> GELU -> LayerNorm -> Linear(H, target_dim * R)`` (the BERT
    "prediction head transform" followed by an output projection), then each encoder frame's
    ``R * target_dim`` outputs are unfolded back into R frames, so the prediction is at the
    front-end's frame rate even when the encoder stacks R frames.

    Args:
        hidden_size: H.
        target_dim: target feature dimension (80 mel bins, 201 linear bins, ...).
        downsample: R of the encoder.
        ln_eps: LayerNorm epsilon.
        init_std: normal init std of the Linear weights.
        zero_out: start the output projection at zero, so the first prediction is the
            target's mean (0 for a CMVN'd target) rather than noise (see MAMConfig.head_init).
    """

    def __init__(self, hidden_size: int, target_dim: int, downsample: int = 1, ln_eps: float = 1e-12,
                 init_std: float = 0.02, zero_out: bool = False) -> None:
        super().__init__()
        self.target_dim = target_dim
        self.downsample = downsample
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(hidden_size, eps=ln_eps)
        self.out = nn.Linear(hidden_size, target_dim * downsample)
        self.apply(lambda m: init_bert_weights(m, init_std))
        if zero_out:
            nn.init.zeros_(self.out.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T', H) encoder output -> (B, T' * R, target_dim) predictions."""
        y = self.out(self.ln(self.act(self.dense(h))))  # (B, T', R * target_dim)
        # Same (r d) order as the encoder's stacking, so frame t*R + r maps back to itself.
        return rearrange(y, "b t (r d) -> b (t r) d", r=self.downsample)


class MaskedLMHead(nn.Module):
    """BERT's LM head: Linear -> GELU -> LayerNorm -> scores against the (tied) embeddings + bias."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """x (..., H), embedding (V, H) -> logits (..., V)."""
        return F.linear(self.norm(F.gelu(self.dense(x))), embedding, self.bias)
