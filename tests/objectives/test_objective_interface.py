"""The objective interface: a new masked-prediction objective is one class pair, chosen by a preset.

The objective below is the example of DEVELOPING.md ("Adding an objective"): targets from a
frozen random projection of the stacked input (a small BEST-RQ), cross-entropy on masked
frames. It must train through the generic PretrainModel, keep its frozen buffers in the
checkpoint bit for bit, and round-trip its config by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import ConfigError
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMConfig
from aviary.models.registry import build_pretrain, config_from_dict
from aviary.objectives.base import Objective, ObjectiveConfig, PretrainModel
from aviary.objectives.masking import bernoulli_span_mask
from aviary.objectives.mlm import masked_lm_loss


@dataclass(frozen=True)
class RandomProjectionConfig(ObjectiveConfig):
    name: str = "randproj-test"
    codebook_size: int = 32
    mask_prob: float = 0.1
    span: int = 2

    def build(self, upstream):
        return RandomProjection(self, upstream.frontend.dim * upstream.encoder.downsample, upstream.hidden_size)


class RandomProjection(Objective):
    def __init__(self, cfg, in_dim, hidden):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(in_dim, 8, generator=g))
        self.register_buffer("codebook", F.normalize(torch.randn(cfg.codebook_size, 8, generator=g), dim=-1))
        self.head = nn.Linear(hidden, cfg.codebook_size)

    def forward(self, upstream, batch, generator=None):
        wavs, lens = upstream.as_batch(batch["wavs"], batch.get("wav_lengths"), check_finite=False)
        x, xlen = upstream.encoder.stack(*upstream.features(wavs, lens))  # (B, T', D*R)
        mask = batch.get("mask")
        if mask is None:
            mask = bernoulli_span_mask(xlen, x.shape[1], self.cfg.mask_prob, self.cfg.span, generator)
        targets = (F.normalize(x @ self.proj, dim=-1) @ self.codebook.T).argmax(-1)  # from the clean input
        hidden, _ = upstream.encoder.encode(x.masked_fill(mask[..., None], 0.0), xlen)
        return masked_lm_loss(self.head(hidden[-1]), targets, mask)


def _cfg(**kw) -> MAMConfig:
    enc = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, downsample=3)
    return MAMConfig(variant="randproj-test", encoder=enc, objective=RandomProjectionConfig(**kw))


def _batch():
    return {"wavs": torch.randn(2, 8000), "wav_lengths": torch.tensor([8000, 5000])}


def test_a_preset_chooses_a_new_objective_and_it_trains():
    torch.manual_seed(0)
    model = build_pretrain(_cfg())
    assert isinstance(model, PretrainModel) and isinstance(model.objective, RandomProjection)
    out = model(_batch(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.metrics["num_masked"] > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.upstream.parameters() if p.requires_grad)
    assert model.objective.head.weight.grad.abs().sum() > 0
    # Same generator state -> same masks and loss (eval: no dropout).
    model.eval()
    batch = _batch()
    a = model(batch, generator=torch.Generator().manual_seed(3))
    b = model(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and a.metrics["num_masked"] == b.metrics["num_masked"]


def test_new_objective_buffers_saved_under_objective_prefix_and_restored_bitwise():
    torch.manual_seed(0)
    model = build_pretrain(_cfg())
    sd = model.state_dict()
    assert {"objective.proj", "objective.codebook", "objective.head.weight"} <= set(sd)
    assert all(k.startswith(("upstream.", "objective.")) for k in sd)
    torch.manual_seed(1)
    other = build_pretrain(config_from_dict(_cfg().to_dict()))
    other.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any(k == "objective.proj" for k, _ in model.named_parameters())  # frozen: a buffer


def test_objective_config_round_trips_by_name_and_refuses_unknown_names():
    cfg = _cfg(codebook_size=16)
    d = cfg.to_dict()
    assert d["objective"] == {"name": "randproj-test", "codebook_size": 16, "mask_prob": 0.1, "span": 2}
    assert config_from_dict(d) == cfg
    with pytest.raises(ConfigError, match="unknown objective"):
        config_from_dict({**d, "objective": {**d["objective"], "name": "no-such-objective"}})
    with pytest.raises(ConfigError, match="variant"):
        MAMConfig(variant="mockingjay", objective=RandomProjectionConfig())


def test_pinned_mask_in_the_batch_is_used():
    torch.manual_seed(0)
    model = build_pretrain(_cfg()).eval()
    batch = _batch()
    T = model.upstream.encoder.stack(*model.upstream.features(batch["wavs"], batch["wav_lengths"]))[0].shape[1]
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 3:5] = True
    out = model(batch | {"mask": mask})
    assert out.metrics["num_masked"] == 2
