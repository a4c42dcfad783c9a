"""SSAST: the Self-Supervised Audio Spectrogram Transformer (Gong et al., AAAI 2022).

A ViT over a 128-bin Kaldi-style fbank::

    fbank (B, T, 128) -> Conv2d(1, D, kernel=patch, stride) -> patch grid (B, Tg, Fg, D)
        [masked patches -> mask token]  + learned position embedding (per grid cell)
        -> [cls, dist] prefix tokens (+ their own position embeddings)
        -> L pre-LN transformer layers (LayerNorm eps 1e-6, GELU, no dropout: timm DeiT)
        -> final LayerNorm

Two shapes of patch (REFERENCE.md section 3):

* **patch** model: 16 x 16 patches, 8 x 64 = 512 tokens for 1024 frames. Good for general
  audio; a token is a (time, frequency) cell, so only utterance-level tasks apply.
* **frame** model: 128 x 2 patches (all bins, 2 frames), 512 tokens, one per 20 ms; its
  tokens are frames, so frame-level (phone) probing works.

The encoder (patch embedding, time-major tokens, inputs of any length, position
embeddings) is :mod:`aviary.models.ssast_encoder`; the pretraining objective is
:class:`~aviary.objectives.mspm.MSPM`.

Not in SSAST, off in the paper-size presets: ``alibi_slope`` adds an ALiBi-style penalty on
the time distance between tokens to every layer's attention scores. The CPU presets use it:
without it a frame model trained for minutes never leaves chance-level retrieval (the
measurements are in :func:`ssast_frame_cpu`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import torch

from aviary.config import Config, check, check_range
from aviary.features import FrontEndConfig, build_frontend, compute_global_stats
from aviary.models.registry import Family, register_family, register_preset
from aviary.models.ssast_encoder import SSASTEncoder, SSASTEncoderConfig
from aviary.models.upstream import Upstream
from aviary.objectives.mspm import MSPM, MSPMConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSASTConfig(Config):
    """Pretraining config of the ``ssast`` family: front-end, encoder, objective, crop.

    Attributes:
        family: always ``"ssast"`` (checkpoints dispatch on it).
        frontend: the fbank front-end; its ``fbank_mean`` / ``fbank_std`` hold the corpus
            statistics, so a loaded model normalises exactly as in pretraining.
        encoder: ViT size and patch grid.
        objective: masking and loss weights.
        max_frames: pretraining clips longer than this are randomly cropped to it (1024 =
            10.24 s in the paper); it should match the position grid.
    """

    family: str = "ssast"
    frontend: FrontEndConfig = field(default_factory=lambda: FrontEndConfig(kind="fbank", n_mels=128))
    encoder: SSASTEncoderConfig = field(default_factory=SSASTEncoderConfig)
    objective: MSPMConfig = field(default_factory=MSPMConfig)
    max_frames: int = 1024

    def validate(self) -> None:
        check(self.family == "ssast", "family", self.family, "'ssast'")
        check(self.frontend.dim == self.encoder.n_mels, "encoder.n_mels", self.encoder.n_mels,
              f"the front-end's feature dimension {self.frontend.dim}")
        check_range("max_frames", self.max_frames, self.encoder.patch_time)


class SSASTUpstream(Upstream):
    """fbank front-end + SSAST encoder; ``extract`` returns patch tokens of every layer.

    Attributes:
        frame_shift: seconds per grid time step (0.02 for the frame model, 0.16 for 16 x 16).
        tokens_per_step: patch tokens per time step (Fg: 1 for the frame model, 8 for patches).
        utterance_level_only: True when tokens are not frames (Fg > 1): frame-level tasks
            such as phone probing must refuse this upstream; pool the tokens instead.
    """

    def __init__(self, frontend: FrontEndConfig, encoder: SSASTEncoderConfig):
        super().__init__()
        self.frontend = build_frontend(frontend)
        self.encoder = SSASTEncoder(encoder)
        self.hidden_size = encoder.hidden_size
        self.num_hidden_states = encoder.num_layers + 1
        self.frame_shift = frontend.frame_shift * encoder.stride_time
        self.sample_rate = frontend.sample_rate
        self.tokens_per_step = encoder.grid_freq
        self.utterance_level_only = encoder.grid_freq > 1

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Hidden states of the patch tokens (prefix tokens excluded).

        Returns:
            (hidden_states, lengths): ``min(max_layer, L) + 1`` tensors (B, N, D) with
            N = Tg * Fg time-major tokens, and (B,) valid tokens per clip. For the frame
            model a token is a 20 ms frame; for the patch model mean-pool over ``lengths``.
            ``hidden_states[0]`` is the embedding output (patches + positions), ``[k]`` the
            residual stream after layer k, and ``[L]`` is taken after the final LayerNorm
            (what the SSAST heads and its fine-tuning classifier read).
        """
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        feats, flen = self.frontend(wavs, wav_lengths)
        out = self.encoder(feats, flen, max_layer=max_layer)
        P = self.encoder.num_prefix_tokens
        return [h[:, P:] for h in out.hidden_states], out.lengths


def with_fbank_stats(cfg: SSASTConfig, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> SSASTConfig:
    """``cfg`` with the front-end's fbank mean / std measured on a corpus (SSAST normalises
    with dataset statistics; the AudioSet values are only the default).

    Args:
        cfg: an SSAST pretraining config.
        batches: iterable of (wavs (B, N), lengths (B,)) from the pretraining corpus.

    Returns:
        The config with ``frontend.fbank_mean`` / ``fbank_std`` filled in; it is stored in
        every checkpoint, so a loaded model normalises exactly as in pretraining.
    """
    return cfg.replace(frontend=compute_global_stats(cfg.frontend, batches).to_dict())


def build_objective(cfg: SSASTConfig, upstream: SSASTUpstream) -> MSPM:
    """MSPM with its two heads, sized from the encoder; clips cropped to ``max_frames``."""
    return MSPM(cfg.objective, cfg.encoder.hidden_size, cfg.encoder.patch_dim, cfg.max_frames)


def build_upstream(cfg: SSASTConfig) -> SSASTUpstream:
    return SSASTUpstream(cfg.frontend, cfg.encoder)


register_family(Family(name="ssast", config_cls=SSASTConfig, build_upstream=build_upstream,
                       build_objective=build_objective, batch_kind="audio",
                       fit_corpus_stats=with_fbank_stats))


# name -> (hidden, layers, heads); tiny / small / base are DeiT's sizes used by SSAST.
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "cpu": (96, 4, 4)}


def ssast_config(kind: str, size: str, max_frames: int = 1024, num_masked: int = 400,
                 num_masked_of: int = 512, **encoder_overrides) -> SSASTConfig:
    """Build an SSAST pretraining config.

    Args:
        kind: ``"patch"`` (16 x 16 patches, cluster masking) or ``"frame"`` (128 x 2 patches,
            random masking: the paper found clustering hurts frame models).
        size: a key of :data:`SIZES`.
        max_frames: pretraining length in frames; the position grid covers it exactly.
        num_masked, num_masked_of: masked patches per reference patch count (400 of 512).
        **encoder_overrides: other :class:`SSASTEncoderConfig` fields.
    """
    if kind not in ("patch", "frame"):
        raise ValueError(f"SSAST kind must be 'patch' or 'frame', got {kind!r}")
    if size not in SIZES:
        raise ValueError(f"SSAST size {size!r} unknown; known: {sorted(SIZES)}")
    D, L, H = SIZES[size]
    pf, pt = (16, 16) if kind == "patch" else (128, 2)
    enc = dict(hidden_size=D, num_layers=L, num_heads=H, ffn_size=4 * D, patch_freq=pf, patch_time=pt,
               stride_freq=pf, stride_time=pt, pos_freq=(128 - pf) // pf + 1,
               pos_time=(max_frames - pt) // pt + 1)
    enc.update(encoder_overrides)
    return SSASTConfig(encoder=SSASTEncoderConfig(**enc),
                       objective=MSPMConfig(masking="cluster" if kind == "patch" else "random",
                                            num_masked=num_masked, num_masked_of=num_masked_of),
                       max_frames=max_frames)


@register_preset("ssast-patch-tiny")
def ssast_patch_tiny() -> SSASTConfig:
    """SSAST-Patch tiny: 192/12/3, 16x16 patches over 1024 frames, 400 of 512 masked (clusters)."""
    return ssast_config("patch", "tiny")


@register_preset("ssast-patch-small")
def ssast_patch_small() -> SSASTConfig:
    """SSAST-Patch small: 384/12/6, 16x16 patches over 1024 frames, 400 of 512 masked (clusters)."""
    return ssast_config("patch", "small")


@register_preset("ssast-patch-base")
def ssast_patch_base() -> SSASTConfig:
    """SSAST-Patch base: 768/12/12, 16x16 patches over 1024 frames, 400 of 512 masked (clusters)."""
    return ssast_config("patch", "base")


@register_preset("ssast-frame-tiny")
def ssast_frame_tiny() -> SSASTConfig:
    """SSAST-Frame tiny: 192/12/3, 128x2 patches (20 ms tokens), 400 of 512 masked (random)."""
    return ssast_config("frame", "tiny")


@register_preset("ssast-frame-small")
def ssast_frame_small() -> SSASTConfig:
    """SSAST-Frame small: 384/12/6, 128x2 patches (20 ms tokens), 400 of 512 masked (random)."""
    return ssast_config("frame", "small")


@register_preset("ssast-frame-base")
def ssast_frame_base() -> SSASTConfig:
    """SSAST-Frame base: 768/12/12, 128x2 patches (20 ms tokens), 400 of 512 masked (random)."""
    return ssast_config("frame", "base")


@register_preset("ssast-patch-cpu")
def ssast_patch_cpu() -> SSASTConfig:
    """CPU-sized SSAST-Patch: 96/4/4, 16x16 patches over 256 frames (128 patches, 100 masked),
    with the time-distance attention bias of :func:`ssast_frame_cpu` (``alibi_slope=1``)."""
    return ssast_config("patch", "cpu", max_frames=256, alibi_slope=1.0)


@register_preset("ssast-frame-cpu")
def ssast_frame_cpu() -> SSASTConfig:
    """CPU-sized SSAST-Frame: 96/4/4, 128x2 patches over 256 frames (128 tokens, 100 masked),
    with an ALiBi-style time-distance attention bias (``alibi_slope=1``).

    Why the bias (not in SSAST): every masked frame enters the encoder as the same mask token
    plus a learned position embedding initialised at std 0.02, about 15x smaller than a patch
    embedding, so attention starts uniform and every masked output is the clip average. A
    frame's only clue is its neighbourhood (a patch model can at least tell frequency rows
    apart), and on CPU budgets the model never finds it: measured on synthetic speech, 500
    steps of SSAST as published keep masked-frame retrieval at chance (1 %) with uniform
    attention and shrinking position embeddings, whatever the lr (5e-4..2e-3), masking ratio
    (20-78 %) or position init (sinusoidal, up to 2.7x the patch embedding); with the bias
    the same run reaches ~5 % in 150 steps (a nearest-neighbour oracle gets 8 %).
    """
    return ssast_config("frame", "cpu", max_frames=256, alibi_slope=1.0)
