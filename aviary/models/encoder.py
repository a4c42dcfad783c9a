"""Transformer encoder over continuous feature frames (Mockingjay, Audio ALBERT, TERA).

Mockingjay (Liu et al. 2020, section 2.1) feeds spectrogram frames into a BERT encoder::

    feats (B, T, D) -> stack R frames (B, T/R, D*R) -> Linear(D*R -> H) -> + sinusoidal PE
          -> LayerNorm -> Dropout -> L transformer layers

Audio ALBERT (Chi et al. 2021) is the same encoder with one layer's parameters applied L
times (``share_layers=True``). TERA uses it unchanged; only its masking differs.

Frame stacking ("downsampling", R > 1) shortens the sequence R-fold so that attention's
T^2 cost drops R^2-fold (Mockingjay LARGE and AALBERT use R = 3). aviary rounds the output
length UP: ``out_len = ceil(len / R)`` and the last, incomplete group is filled with zeros,
so no frame is dropped; s3prl instead drops the ``len % R`` trailing frames
(``stack_tail="drop"``, set for imported s3prl checkpoints). Frames past a row's length are
zeroed before stacking, so a padded row stacks exactly like the same utterance alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from einops import rearrange

from aviary.config import Config, check, check_choice, check_range
from aviary.lengths import padding_mask, valid_mask
from aviary.models.layers import TransformerStack, init_bert_weights, sinusoidal_positions


@dataclass(frozen=True)
class EncoderConfig(Config):
    """Size and behaviour of :class:`TransformerEncoder`.

    The input dimension is not stored here: it comes from the front-end when the encoder
    is built, so the two can never disagree.
    """

    hidden_size: int = 768
    num_layers: int = 3
    num_heads: int = 12
    ffn_size: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    activation: str = "gelu"
    pre_ln: bool = False  # Mockingjay / BERT put LayerNorm after the residual (post-LN)
    ln_eps: float = 1e-12  # BERT's value; the Mockingjay code inherits it
    share_layers: bool = False  # True = Audio ALBERT
    # "alibi" adds a fixed distance penalty to the attention scores (layers.alibi_bias) on top
    # of the sinusoidal positions; see the CPU presets in models/mam_presets.py for why.
    position_bias: Literal["none", "alibi"] = "none"
    alibi_first_slope: float = 0.0  # head 0's slope; 0 = Press et al.'s 2^(-8 / num_heads)
    downsample: int = 1  # R: consecutive frames stacked into one encoder frame
    init_std: float = 0.02
    # R > 1 only: "pad" keeps a last, incomplete group of frames (zero-filled; ceil(T/R)
    # encoder frames); "drop" discards it (floor(T/R)), as s3prl's downsampling does.
    stack_tail: Literal["pad", "drop"] = "pad"

    def validate(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "ffn_size", "downsample"):
            check_range(key, getattr(self, key), lo=1)
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"a multiple of num_heads={self.num_heads}")
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("attn_dropout", self.attn_dropout, 0.0, 1.0, hi_open=True)
        check_choice("activation", self.activation, ("gelu", "gelu_tanh", "relu"))
        check_choice("position_bias", self.position_bias, ("none", "alibi"))
        check_range("alibi_first_slope", self.alibi_first_slope, 0.0)
        check_range("ln_eps", self.ln_eps, 0.0, lo_open=True)
        check_range("init_std", self.init_std, 0.0, lo_open=True)


def stack_frames(feats: torch.Tensor, lengths: torch.Tensor, R: int, drop_tail: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack R consecutive frames into one: (B, T, D) -> (B, ceil(T/R), D*R).

    Frames at or past ``lengths`` are zeroed first and T is zero-padded to a multiple of R,
    so a padded row gives the same result as the utterance alone.

    Args:
        feats: (B, T, D).
        lengths: (B,) valid frames per row.
        R: stacking factor (1 returns the input, with padding frames zeroed).
        drop_tail: report ``floor(lengths / R)`` valid frames (s3prl), so the last,
            incomplete group counts as padding; the tensor keeps its ceil(T/R) frames.

    Returns:
        (stacked (B, ceil(T/R), D*R), ceil(lengths / R) or floor(lengths / R)).
    """
    B, T, D = feats.shape
    valid = valid_mask(lengths, T)  # (B, T)
    feats = feats * valid[..., None].to(feats.dtype)
    if R == 1:
        return feats, lengths
    pad = (-T) % R
    if pad:
        feats = torch.nn.functional.pad(feats, (0, 0, 0, pad))  # (B, T + pad, D)
    stacked = rearrange(feats, "b (t r) d -> b t (r d)", r=R)
    return stacked, torch.div(lengths + (0 if drop_tail else R - 1), R, rounding_mode="floor")


class TransformerEncoder(nn.Module):
    """Mockingjay-style encoder: frame stacking, input projection, positions, L layers.

    Args:
        cfg: sizes and switches.
        input_dim: D, the feature dimension of the front-end feeding this encoder.
    """

    def __init__(self, cfg: EncoderConfig, input_dim: int) -> None:
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        self.config = cfg
        self.input_dim = input_dim
        self.downsample = cfg.downsample
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_layers
        self.input_proj = nn.Linear(input_dim * cfg.downsample, cfg.hidden_size)
        self.input_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_eps)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = TransformerStack(
            cfg.num_layers, share_layers=cfg.share_layers, position_bias=cfg.position_bias,
            alibi_first_slope=cfg.alibi_first_slope, hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads, ffn_size=cfg.ffn_size, dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout, activation=cfg.activation, pre_ln=cfg.pre_ln,
            ln_eps=cfg.ln_eps)
        self.apply(lambda m: init_bert_weights(m, cfg.init_std))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames for ``lengths`` input frames: ``ceil(lengths / R)`` (``floor`` when
        ``stack_tail="drop"``)."""
        tail = 0 if self.config.stack_tail == "drop" else self.downsample - 1
        return torch.div(lengths + tail, self.downsample, rounding_mode="floor")

    def stack(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the input and stack R frames: (B, T, D) -> (B, ceil(T/R), D*R), lengths."""
        if feats.dim() != 3 or feats.shape[-1] != self.input_dim:
            raise ValueError(f"encoder expects feats (B, T, {self.input_dim}), got {tuple(feats.shape)}")
        if lengths.shape != (feats.shape[0],):
            raise ValueError(f"lengths must be ({feats.shape[0]},), got {tuple(lengths.shape)}")
        drop = self.config.stack_tail == "drop"
        need = self.downsample if drop else 1
        if feats.shape[1] == 0 or int(lengths.min()) < need:
            raise ValueError(f"every row needs >= {need} frame(s); got T={feats.shape[1]}, lengths={lengths.tolist()}")
        return stack_frames(feats, lengths, self.downsample, drop_tail=drop)

    def encode(self, stacked: torch.Tensor, lengths: torch.Tensor, max_layer: int | None = None,
               need_weights: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Run the encoder on already stacked (and possibly masked) frames.

        Args:
            stacked: (B, T', D*R) output of :meth:`stack` (masking happens between the two,
                at the encoder frame rate, as in s3prl).
            lengths: (B,) valid encoder frames, each >= 1.
            max_layer, need_weights: see :meth:`forward`.

        Returns:
            (hidden_states, attentions) as in :meth:`forward`.
        """
        if stacked.dim() != 3 or stacked.shape[-1] != self.input_dim * self.downsample:
            raise ValueError(f"encode expects (B, T', {self.input_dim * self.downsample}), "
                             f"got {tuple(stacked.shape)}")
        x = self.input_proj(stacked)  # (B, T', H)
        # Fixed sinusoidal positions (Mockingjay section 2.1): any length works.
        x = x + sinusoidal_positions(x.shape[1], self.hidden_size, x.device, x.dtype)
        x = self.input_dropout(self.input_ln(x))
        kpm = padding_mask(lengths, x.shape[1])  # (B, T'), True = padding
        return self.layers(x, kpm, need_weights=need_weights, max_layer=max_layer)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, max_layer: int | None = None,
                need_weights: bool = False
                ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None]:
        """Encode a padded batch of feature frames.

        Args:
            feats: (B, T, D) features; frames past ``lengths`` are ignored.
            lengths: (B,) valid frames per row, each >= 1.
            max_layer: stop after this many layers (0 = embedding output only).
            need_weights: also return every layer's attention probabilities (slower path).

        Returns:
            (hidden_states, out_lengths, attentions): ``min(max_layer, L) + 1`` tensors
            (B, T', H) with T' = ceil(T / R), the embedding output first; (B,) valid encoder
            frames ``ceil(lengths / R)``; per-layer (B, heads, T', T') probabilities or ``None``.
            Values at padded positions are unspecified.
        """
        stacked, out_lengths = self.stack(feats, lengths)  # (B, T', D*R)
        hidden_states, attentions = self.encode(stacked, out_lengths, max_layer, need_weights)
        return hidden_states, out_lengths, attentions
