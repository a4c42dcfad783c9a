"""A tiny model family and in-memory data for the loop's tests (fast; no files read).

``tiny-test`` frames the waveform into 160-sample chunks, masks a random subset (drawn from
the global torch RNG, as real objectives do, so the loop's seeding is exercised), and
predicts the masked chunks with L1 loss. It follows the family contract of
``aviary/models/registry.py``: an upstream and an objective, composed by ``PretrainModel``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from aviary.config import Config, check_range
from aviary.models.registry import FAMILIES, PRESETS, Family, register_family, register_preset
from aviary.models.upstream import Upstream
from aviary.lengths import valid_mask
from aviary.objectives.base import Objective, ObjectiveOutput, PretrainModel
from aviary.train.data import TrainData

FRAME = 160


@dataclasses.dataclass(frozen=True)
class TinyConfig(Config):
    family: str = "tiny-test"
    hidden: int = 16
    dropout: float = 0.1
    mask_prob: float = 0.3

    def validate(self) -> None:
        check_range("hidden", self.hidden, 1)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("mask_prob", self.mask_prob, 0.0, 1.0)


class TinyUpstream(Upstream):
    frame_shift = FRAME / 16000

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.hidden_size = cfg.hidden
        self.num_hidden_states = 2
        self.proj = nn.Linear(FRAME, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.layer = nn.Linear(cfg.hidden, cfg.hidden)

    def frames(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = wavs.shape[1] // FRAME
        return wavs[:, : t * FRAME].reshape(wavs.shape[0], t, FRAME), wav_lengths // FRAME  # (B, T, 160)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        h0 = self.norm(self.proj(x))
        return [h0, h0 + torch.tanh(self.layer(h0))]

    def extract(self, wavs, wav_lengths=None, max_layer=None):
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        x, lengths = self.frames(wavs, wav_lengths)
        hs = self.encode(x)
        return hs[: (max_layer + 1) if max_layer is not None else None], lengths


class TinyObjective(Objective):
    state_prefix = ""  # keys "head.*", as the family's checkpoints had before objectives were modules

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, FRAME)
        self.progress: tuple[int, int] | None = None

    def set_progress(self, upstream: nn.Module, step: int, total: int) -> None:
        self.progress = (step, total)

    def forward(self, upstream: TinyUpstream, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        x, lengths = upstream.frames(batch["wavs"], batch["wav_lengths"])  # (B, T, 160)
        valid = valid_mask(lengths, x.shape[1])  # (B, T)
        mask = (torch.rand(valid.shape, generator=generator, device=x.device) < self.config.mask_prob) & valid
        mask[:, 0] |= valid[:, 0]  # at least one scored frame per row
        h = upstream.encode(x * (~mask)[..., None])[-1]
        pred = self.head(self.drop(h))
        err = (pred.float() - x.float()).abs().mean(-1)  # (B, T)
        loss = (err * mask).sum() / mask.sum()
        return ObjectiveOutput(loss, {"masked_frac": mask.sum() / valid.sum()})


def TinyPretrain(cfg: TinyConfig) -> PretrainModel:
    return FAMILIES["tiny-test"].build_pretrain(cfg)


def _register() -> None:
    if "tiny-test" not in FAMILIES:
        register_family(Family("tiny-test", TinyConfig, TinyUpstream, lambda cfg, up: TinyObjective(cfg), "audio"))
    if "tiny-test" not in PRESETS:
        register_preset("tiny-test", "test-only tiny model")(lambda: TinyConfig())
    if "tiny-test-nodrop" not in PRESETS:
        register_preset("tiny-test-nodrop", "test-only tiny model, no dropout")(
            lambda: TinyConfig(dropout=0.0))


_register()


class SineData(TrainData):
    """``n`` in-memory utterances of noisy sines with varied lengths; crops seeded per item.

    ``nan_items``: indices whose waveform is NaN (numerical-safety tests).
    """

    unit = "s"

    def __init__(self, n: int = 24, max_batch_seconds: float = 0.6, crop_seconds: float = 0.25,
                 nan_items: set[int] | None = None, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(1600, 6400, n)  # 0.1 .. 0.4 s
        self.freqs = rng.uniform(100, 2000, n)
        self.max_batch_seconds = max_batch_seconds
        self.crop = int(crop_seconds * 16000)
        self.nan_items = nan_items or set()

    def __len__(self) -> int:
        return len(self.lengths)

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        from aviary.train.data import duration_batches

        durs = [min(int(n), self.crop) / 16000 for n in self.lengths]
        return duration_batches(durs, self.max_batch_seconds, seed, epoch)

    def load_item(self, index: int, seed: int):
        n = int(self.lengths[index])
        t = np.arange(n) / 16000
        noise = np.random.default_rng(index).normal(0, 0.05, n)
        wav = (0.5 * np.sin(2 * np.pi * self.freqs[index] * t) + noise).astype(np.float32)
        if n > self.crop:
            off = int(np.random.default_rng(seed).integers(0, n - self.crop + 1))
            wav = wav[off: off + self.crop]
        if index in self.nan_items:
            wav[:] = np.nan
        return {"id": f"u{index}", "speaker": "s0", "wav": torch.from_numpy(wav)}

    def collate(self, items):
        lengths = torch.tensor([it["wav"].numel() for it in items])
        wavs = torch.zeros(len(items), int(lengths.max()))
        for i, it in enumerate(items):
            wavs[i, : it["wav"].numel()] = it["wav"]
        return {"wavs": wavs, "wav_lengths": lengths, "ids": [it["id"] for it in items],
                "speakers": [it["speaker"] for it in items]}

    def batch_amount(self, batch):
        return float(batch["wav_lengths"].sum()) / 16000
