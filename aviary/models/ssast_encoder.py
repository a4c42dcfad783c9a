"""The SSAST patch encoder: a ViT over spectrogram patches (Gong et al., AAAI 2022); the
pipeline is drawn in :mod:`aviary.models.ssast`.

Token order is **time-major** (``index = t * Fg + f``), unlike the reference code, which
flattens frequency-major. With time-major order the valid tokens of a clip are a prefix of
its row, so sequences travel with plain lengths, a padded batch gives the same result as
each clip alone, and mean pooling over ``lengths`` tokens is correct. The importer
(:mod:`aviary.interop.ssast`) reorders the released position embeddings accordingly.

Inputs of any length: the time axis is zero-padded (after normalisation, 0 is the corpus
mean) to a whole number of strides and each clip keeps its own count of valid time steps;
position embeddings depend on a clip's own length only (:meth:`SSASTEncoder.position_embeddings`:
unlike the reference's centre cut, which depends on the padded batch length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from aviary.config import Config, check, check_range
from aviary.lengths import padding_mask
from aviary.models.layers import PatchEmbed, TransformerStack, alibi_slopes


@dataclass(frozen=True)
class SSASTEncoderConfig(Config):
    """Size of the SSAST ViT and its patch grid.

    Attributes:
        hidden_size, num_layers, num_heads, ffn_size: D, L, heads, MLP width (4 D in DeiT).
        dropout, attn_dropout: 0 in SSAST (timm DeiT defaults).
        ln_eps: LayerNorm epsilon; 1e-6 as in timm's ViT.
        n_mels: frequency bins of the input fbank.
        patch_freq, patch_time: patch size in bins x frames (16 x 16 or 128 x 2).
        stride_freq, stride_time: patch strides; equal to the patch size in pretraining,
            smaller (overlapping patches) allowed at fine-tuning.
        num_prefix_tokens: 0, 1 (cls) or 2 (cls + dist, as in the released models).
        pos_freq, pos_time: the learned position-embedding grid, i.e. the pretraining grid
            (8 x 64 for 16 x 16 patches over 128 x 1024; 1 x 512 for the frame model).
        init_std: std of the truncated-normal initialisation (0.02, as timm).
        alibi_slope: 0 (SSAST, the default) or the slope of an ALiBi-style penalty on the
            time distance between patch tokens (:meth:`SSASTEncoder.attention_bias`). Not in
            SSAST: the CPU presets use it (measurements: ``aviary.models.ssast.ssast_frame_cpu``).
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ln_eps: float = 1e-6
    n_mels: int = 128
    patch_freq: int = 16
    patch_time: int = 16
    stride_freq: int = 16
    stride_time: int = 16
    num_prefix_tokens: int = 2
    pos_freq: int = 8
    pos_time: int = 64
    init_std: float = 0.02
    alibi_slope: float = 0.0

    def validate(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "ffn_size", "n_mels", "patch_freq",
                    "patch_time", "stride_freq", "stride_time", "pos_freq", "pos_time"):
            check_range(key, getattr(self, key), lo=1)
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"a multiple of num_heads={self.num_heads}")
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("attn_dropout", self.attn_dropout, 0.0, 1.0, hi_open=True)
        check_range("ln_eps", self.ln_eps, 0.0, lo_open=True)
        check_range("patch_freq", self.patch_freq, 1, self.n_mels)
        check_range("stride_freq", self.stride_freq, 1, self.patch_freq)
        check_range("stride_time", self.stride_time, 1, self.patch_time)
        check_range("num_prefix_tokens", self.num_prefix_tokens, 0, 2)
        check_range("init_std", self.init_std, 0.0, lo_open=True)
        check_range("alibi_slope", self.alibi_slope, 0.0)

    @property
    def patch_dim(self) -> int:
        """Values per patch, K (256 for both 16 x 16 and 128 x 2)."""
        return self.patch_freq * self.patch_time

    @property
    def grid_freq(self) -> int:
        """Patches along frequency, Fg (no padding on this axis, as in the reference)."""
        return (self.n_mels - self.patch_freq) // self.stride_freq + 1


@dataclass
class SSASTEncoderOutput:
    """What :meth:`SSASTEncoder.forward` returns.

    Attributes:
        hidden_states: L' + 1 tensors (B, P + N, D): prefix tokens first, then N = Tg * Fg
            patch tokens in time-major order. The last one is after the final LayerNorm
            when all L layers ran.
        lengths: (B,) valid PATCH tokens per clip (prefix tokens not counted).
        grid: (Tg, Fg), the padded patch grid.
        attentions: per-layer attention probabilities when asked for, else None.
    """

    hidden_states: list[torch.Tensor]
    lengths: torch.Tensor
    grid: tuple[int, int]
    attentions: list[torch.Tensor] | None = None


class SSASTEncoder(nn.Module):
    """Patch embedding, prefix tokens, position embeddings, mask token and the ViT.

    Args:
        cfg: the encoder config.
    """

    def __init__(self, cfg: SSASTEncoderConfig):
        super().__init__()
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        self.patch_dim = cfg.patch_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(D, (cfg.patch_freq, cfg.patch_time), (cfg.stride_freq, cfg.stride_time))
        # Prefix tokens: cls (and DeiT's distillation token). Not used by the MSPM loss or by
        # mean pooling, but part of the released models' attention context.
        self.prefix_tokens = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, D))
        self.prefix_pos_embed = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, D))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.pos_time, cfg.pos_freq, D))  # (Pt, Pf, D)
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = TransformerStack(cfg.num_layers, hidden_size=D, num_heads=cfg.num_heads,
                                       ffn_size=cfg.ffn_size, dropout=cfg.dropout,
                                       attn_dropout=cfg.attn_dropout, activation="gelu",
                                       pre_ln=True, ln_eps=cfg.ln_eps)
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT initialisation: truncated normal (std 0.02) for linear weights and the
        learned tokens / position embeddings, zero biases, LayerNorm (1, 0)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.prefix_tokens, self.prefix_pos_embed, self.pos_embed, self.mask_token):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

    def time_steps(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid patch columns for clips of ``lengths`` frames: ceil((len - patch) / stride) + 1.

        A clip shorter than one patch still gets one (zero-padded) column.
        """
        c = self.config
        extra = (lengths - c.patch_time).clamp(min=0)
        return torch.div(extra + c.stride_time - 1, c.stride_time, rounding_mode="floor") + 1

    def _pad(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero every frame past a clip's length and pad T to a whole number of strides.

        Returns:
            (feats (B, T', F), valid time steps per clip (B,)).
        """
        c = self.config
        B, T, Fq = feats.shape
        if Fq != c.n_mels:
            raise ValueError(f"SSAST encoder expects {c.n_mels} frequency bins, got features of shape "
                             f"{tuple(feats.shape)}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must be ({B},), got {tuple(lengths.shape)}")
        if B and int(lengths.min()) < 1:
            raise ValueError(f"every clip needs at least one frame; lengths = {lengths.tolist()}")
        feats = feats.masked_fill(padding_mask(lengths, T)[..., None], 0.0)
        steps = int(self.time_steps(torch.tensor(T)))
        t_pad = c.patch_time + (steps - 1) * c.stride_time
        return F.pad(feats, (0, 0, 0, t_pad - T)), self.time_steps(lengths)

    def patchify(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input patches themselves (MSPM targets), in token order.

        Args:
            feats: (B, T, F) normalised fbank; lengths: (B,) valid frames.

        Returns:
            (patches (B, Tg * Fg, K) with K = patch_freq * patch_time flattened
            frequency-major inside the patch as ``nn.Unfold`` does (the layout of the
            reference heads' outputs), grid_valid (B, Tg, Fg) bool).
        """
        c = self.config
        x, steps = self._pad(feats, lengths)
        cols = F.unfold(rearrange(x, "b t f -> b 1 f t"), kernel_size=(c.patch_freq, c.patch_time),
                        stride=(c.stride_freq, c.stride_time))  # (B, K, Fg * Tg), frequency-major
        Tg = (x.shape[1] - c.patch_time) // c.stride_time + 1
        patches = rearrange(cols, "b k (f t) -> b (t f) k", t=Tg)
        valid = ~padding_mask(steps, Tg)  # (B, Tg)
        return patches, valid[:, :, None].expand(-1, -1, c.grid_freq)

    def position_embeddings(self, steps: torch.Tensor, Tg: int) -> torch.Tensor:
        """Position embeddings for a (Tg, Fg) grid, per clip.

        Args:
            steps: (B,) valid time steps per clip.
            Tg: padded time steps.

        Returns:
            (B, Tg, Fg, D). Clips with at most ``pos_time`` steps use the learned rows
            ``0 .. steps-1`` unchanged; longer clips use the grid linearly interpolated to
            their length (``F.interpolate(..., align_corners=False)`` semantics).
        """
        c = self.config
        pos = self.pos_embed  # (Pt, Pf, D)
        Fg = c.grid_freq
        if Fg < c.pos_freq:  # centre cut, as the reference does when fine-tuning
            start = c.pos_freq // 2 - Fg // 2
            pos = pos[:, start:start + Fg]
        elif Fg > c.pos_freq:
            pos = rearrange(F.interpolate(rearrange(pos, "t f d -> t d f"), size=Fg, mode="linear",
                                          align_corners=False), "t d f -> t f d")
        Pt = c.pos_time
        if Tg <= Pt:
            return pos[:Tg].unsqueeze(0).expand(steps.shape[0], -1, -1, -1)
        t = torch.arange(Tg, device=pos.device, dtype=torch.float32)[None, :]  # (1, Tg)
        n = steps.to(torch.float32)[:, None]  # (B, 1)
        # Source coordinate of target step t when stretching Pt rows to n: (t + 0.5) Pt / n - 0.5.
        src = torch.where(n > Pt, (t + 0.5) * Pt / n - 0.5, t)  # (B, Tg)
        src = src.clamp(0, Pt - 1)
        i0 = src.floor().long()  # linear interpolation between rows i0 and i0 + 1
        i1 = (i0 + 1).clamp(max=Pt - 1)
        w = (src - i0).to(pos.dtype)[..., None, None]
        return pos[i0] * (1 - w) + pos[i1] * w  # (B, Tg, Fg, D)

    def attention_bias(self, Tg: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The ALiBi-style time-distance penalty of ``alibi_slope`` (None when it is 0).

        Args:
            Tg: time steps of the (padded) patch grid; the grid has ``Tg * Fg`` tokens in
                time-major order after the ``P`` prefix tokens.

        Returns:
            (heads, P + Tg * Fg, P + Tg * Fg) additive bias: ``-m_h * |t_i - t_j|`` between
            patch tokens (``t``: time step; ``m_h = alibi_slope * 2^(-8 h / heads)``, Press et
            al. 2022), 0 in every row and column of a prefix token. It depends on token
            positions only, never on the batch's padding, so a padded clip is biased exactly
            as the clip alone.
        """
        c = self.config
        if c.alibi_slope == 0:
            return None
        slopes = alibi_slopes(c.num_heads, c.alibi_slope).to(device=device, dtype=torch.float32)  # (heads,)
        t = torch.arange(Tg, device=device).repeat_interleave(c.grid_freq).float()  # (N,) time step per token
        dist = F.pad((t[:, None] - t[None, :]).abs(), (c.num_prefix_tokens, 0, c.num_prefix_tokens, 0))
        return -slopes[:, None, None] * dist  # (heads, P + N, P + N)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None,
                max_layer: int | None = None, need_weights: bool = False) -> SSASTEncoderOutput:
        """Encode a padded batch of fbank features.

        Args:
            feats: (B, T, n_mels) normalised fbank.
            lengths: (B,) valid frames per clip.
            mask: optional (B, Tg * Fg) bool, True = replace that patch by the mask token
                (before the position embedding is added, as in the reference).
            max_layer: stop after this many layers (0 = embedding output only).
            need_weights: also return attention probabilities.

        Returns:
            :class:`SSASTEncoderOutput`.
        """
        x, steps = self._pad(feats, lengths)
        tokens = self.patch_embed(x)  # (B, Tg, Fg, D)
        B, Tg, Fg, D = tokens.shape
        if mask is not None:
            if mask.shape != (B, Tg * Fg):
                raise ValueError(f"mask must be ({B}, {Tg * Fg}) for a {Tg} x {Fg} patch grid, "
                                 f"got {tuple(mask.shape)}")
            m = mask.view(B, Tg, Fg, 1)
            tokens = torch.where(m, self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.position_embeddings(steps, Tg).to(tokens.dtype)
        tokens = rearrange(tokens, "b t f d -> b (t f) d")  # time-major
        P = self.num_prefix_tokens
        prefix = (self.prefix_tokens + self.prefix_pos_embed).to(tokens.dtype)
        x = torch.cat([prefix.unsqueeze(0).expand(B, -1, -1), tokens], dim=1)  # (B, P + N, D)
        x = self.dropout(x)
        n_valid = steps * Fg  # (B,) valid patch tokens
        pad = padding_mask(n_valid + P, P + Tg * Fg)  # prefix is never padding
        bias = self.attention_bias(Tg, x.device)
        hidden, attn = self.layers(x, key_padding_mask=pad, need_weights=need_weights, max_layer=max_layer,
                                   attn_bias=None if bias is None else bias.to(x.dtype))
        if len(hidden) == self.config.num_layers + 1:
            hidden[-1] = self.norm(hidden[-1])
        return SSASTEncoderOutput(hidden_states=hidden, lengths=n_valid, grid=(Tg, Fg), attentions=attn)
