"""Masked prediction of discrete targets on the Mockingjay encoder: BEST-RQ and HuBERT-style.

Both families use the same upstream as the masked acoustic models (front-end -> stack R
frames -> :class:`~aviary.models.encoder.TransformerEncoder`, shared or unshared layers,
ALiBi option), so they extract and probe exactly like Mockingjay / Audio ALBERT; only the
objective differs (:mod:`aviary.objectives.bestrq`, :mod:`aviary.objectives.hubert`). The
pretraining model is the upstream and the objective side by side: ``forward(batch)`` is
``objective(upstream, batch)``.

Presets: ``bestrq-base`` / ``hubert-base`` are the papers' settings on a 768/12-layer encoder
(BEST-RQ: 4 stacked 10 ms frames, 8192 x 16 codebook; HuBERT: 20 ms frames, K = 100 MFCC
clusters, 256-dim cosine head, tau 0.1); the ``*-cpu`` ones use the CPU encoder of the
demo's reconstruction models (256/6L, R = 3, ALiBi) for a CPU budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from aviary.config import Config, check, check_range
from aviary.features import FrontEndConfig
from aviary.features.frontend import compute_global_stats
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMUpstream
from aviary.models.registry import Family, register_family, register_preset
from aviary.objectives.base import ObjectiveOutput
from aviary.objectives.bestrq import BestRQObjective, BestRQObjectiveConfig
from aviary.objectives.hubert import HubertObjective, HubertObjectiveConfig


def _logmel(cmvn: str) -> FrontEndConfig:
    # "global": identity statistics until the pretraining loop measures the corpus's
    # (with_input_stats, before step 0), as SSAST's fbank statistics are.
    stats = dict(cmvn_mean=(0.0,) * 80, cmvn_std=(1.0,) * 80) if cmvn == "global" else {}
    return FrontEndConfig(kind="logmel", n_mels=80, cmvn=cmvn, normalize_db=-25.0, **stats)


def _check_input(cfg: Any) -> None:
    check(cfg.input.kind in ("logmel", "linear"), "input.kind", cfg.input.kind, "'logmel' or 'linear'")
    check_range("chunk_seconds", cfg.chunk_seconds, 1.0, 600.0)


@dataclass(frozen=True)
class BestRQConfig(Config):
    """Pretraining config of BEST-RQ (family ``"bestrq"``, stored in every checkpoint).

    Attributes:
        family: always ``"bestrq"``.
        input: front-end; ``cmvn="global"`` with statistics measured on the training corpus
            before step 0 (the paper normalises the quantiser's input with corpus statistics;
            the same normalised frames feed the encoder).
        encoder: the encoder (R = the quantiser's frame stacking).
        objective: quantiser, masking and loss.
        chunk_seconds: extraction window (as :class:`~aviary.models.mam.MAMConfig`).
    """

    family: str = "bestrq"
    input: FrontEndConfig = field(default_factory=lambda: _logmel("global"))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    objective: BestRQObjectiveConfig = field(default_factory=BestRQObjectiveConfig)
    chunk_seconds: float = 20.0

    def validate(self) -> None:
        check(self.family == "bestrq", "family", self.family, "'bestrq'")
        _check_input(self)


@dataclass(frozen=True)
class HubertConfig(Config):
    """Pretraining config of HuBERT-style training (family ``"hubert"``).

    Attributes:
        family: always ``"hubert"``.
        input, encoder, chunk_seconds: as :class:`BestRQConfig`.
        objective: head, masking and loss (``num_clusters`` is set from the targets).
        targets: the targets directory (``aviary targets kmeans --out DIR``); set by
            ``aviary pretrain --targets DIR``; empty in presets.
        targets_sha256: fingerprint of the targets trained on (their ``targets.json``), filled
            in when training starts, so a checkpoint names exactly the targets it learnt.
    """

    family: str = "hubert"
    input: FrontEndConfig = field(default_factory=lambda: _logmel("utterance"))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    objective: HubertObjectiveConfig = field(default_factory=HubertObjectiveConfig)
    chunk_seconds: float = 20.0
    targets: str = ""
    targets_sha256: str = ""

    def validate(self) -> None:
        check(self.family == "hubert", "family", self.family, "'hubert'")
        _check_input(self)


class MaskedPredictionModel(nn.Module):
    """Upstream + objective: ``forward(batch) = objective(upstream, batch)``.

    Attributes:
        upstream: the :class:`~aviary.models.mam.MAMUpstream` (front-end + encoder).
        objective: the objective module (its head, masking and frozen targets).
        mask_generator: seeds masks and noise when set (tests, analysis); else the global RNG.
    """

    def __init__(self, cfg: BestRQConfig | HubertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.upstream = MAMUpstream(cfg)
        in_dim = self.upstream.frontend.dim * cfg.encoder.downsample
        obj = BestRQObjective if cfg.family == "bestrq" else HubertObjective
        self.objective = obj(cfg.objective, in_dim, cfg.encoder.hidden_size)
        self.mask_generator: torch.Generator | None = None

    def forward(self, batch: dict[str, Any]) -> ObjectiveOutput:
        return self.objective(self.upstream, batch, generator=self.mask_generator)


def with_input_stats(cfg: BestRQConfig, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> BestRQConfig:
    """``cfg`` with the front-end's per-dimension corpus mean / std (global CMVN) measured."""
    if cfg.input.cmvn != "global":
        return cfg
    return cfg.replace(input=compute_global_stats(cfg.input, batches).to_dict())


register_family(Family(name="bestrq", config_cls=BestRQConfig, build_pretrain=MaskedPredictionModel,
                       build_upstream=MAMUpstream, batch_kind="audio", fit_corpus_stats=with_input_stats))
register_family(Family(name="hubert", config_cls=HubertConfig, build_pretrain=MaskedPredictionModel,
                       build_upstream=MAMUpstream, batch_kind="audio-targets"))


_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072)
# The demo's CPU encoder (models/mam.py, _cpu_budget): 256/6L, R = 3, no attention dropout,
# ALiBi with head 0's slope 1 (local attention from step 0).
_CPU = dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024, attn_dropout=0.0, downsample=3,
            position_bias="alibi", alibi_first_slope=1.0)
# CPU masking: the synthetic utterances are 1-3 s (33-100 encoder frames at 30 ms), so the
# papers' 10-frame spans would hide whole words; 3-frame spans (90 ms), ~1/3 of the frames.
_CPU_MASK = dict(mask_proportion=0.4, span=3)


@register_preset("bestrq-base", "BEST-RQ: 768/12L, R=4 (40 ms), 8192 x 16 random codebook, 400 ms noise spans")
def bestrq_base() -> BestRQConfig:
    return BestRQConfig(encoder=EncoderConfig(**_BASE, downsample=4))


@register_preset("bestrq-cpu", "BEST-RQ for a CPU budget: the demo's 256/6L ALiBi encoder, R=3, 512 x 16 codebook")
def bestrq_cpu() -> BestRQConfig:
    return BestRQConfig(encoder=EncoderConfig(**_CPU),
                        objective=BestRQObjectiveConfig(codebook_size=512, **_CPU_MASK))


@register_preset("hubert-base", "HuBERT-style targets: 768/12L, R=2 (20 ms), K=100, cosine head 256, tau 0.1")
def hubert_base() -> HubertConfig:
    return HubertConfig(encoder=EncoderConfig(**_BASE, downsample=2))


@register_preset("hubert-cpu", "HuBERT-style targets for a CPU budget: the demo's 256/6L ALiBi encoder, R=3, K=100")
def hubert_cpu() -> HubertConfig:
    return HubertConfig(encoder=EncoderConfig(**_CPU), objective=HubertObjectiveConfig(**_CPU_MASK))
