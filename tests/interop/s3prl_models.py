"""Tiny aviary bundles of every family, for the s3prl upstream-package tests.

Random weights (seeded) with every parameter moved away from its initial value, so that
LayerNorms, biases and the token table all matter. Each bundle is what ``aviary pretrain``
leaves in a run directory (``save_bundle`` of the pretraining model's state dict).
"""
from __future__ import annotations

from pathlib import Path

import torch

from aviary.config import apply_overrides
from aviary.models.bundle import save_bundle
from aviary.models.registry import get_family, get_preset

TINY_VQ = ["channels=16", "gumbel_hidden=16", "num_vars=8", "aggregator_kernels=[2,3]", "prediction_steps=2",
           "num_negatives=2"]
TINY_SSAST = ["encoder.hidden_size=32", "encoder.num_layers=2", "encoder.num_heads=2"]

# name -> (preset, overrides): one model of every family, plus the settings s3prl's own
# Mockingjay layout cannot hold (R = 3, shared layers, ALiBi, pre-LN, SSAST patches).
MODELS = {
    "aalbert-R3": ("aalbert-tiny", []),
    "mockingjay-preln-alibi": ("mockingjay-tiny", ["encoder.pre_ln=true", "encoder.position_bias=alibi"]),
    "ssast-frame": ("ssast-frame-cpu", TINY_SSAST),
    "ssast-patch": ("ssast-patch-cpu", TINY_SSAST),
    "vq-wav2vec": ("vq-wav2vec-kmeans-cpu", TINY_VQ),
    "token-bert": ("token-bert-cpu", ["hidden_size=32", "num_layers=2", "num_heads=2", "ffn_size=64",
                                      "max_positions=32"]),
}


def model_config(name: str):
    preset, overrides = MODELS[name]
    cfg = apply_overrides(get_preset(preset), overrides)
    if cfg.family == "token-bert":
        # What TokenTrainData.configure_model sets from a token corpus: vocabulary and tokenizer.
        vq = apply_overrides(get_preset("vq-wav2vec-kmeans-cpu"), TINY_VQ)
        cfg = cfg.replace(vocab_size=40, tokenizer=vq)
    return cfg


def make_bundle(directory: Path, name: str, seed: int = 0) -> Path:
    """Write ``directory/name/model.safetensors`` (a run directory) and return the run directory."""
    cfg = model_config(name)
    torch.manual_seed(seed)
    model = get_family(cfg.family).build_pretrain(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        table = getattr(model.upstream, "code_table", None)
        if table is not None:  # token-BERT: a vocabulary over every (group, code) pair
            table.copy_(torch.randint(3, cfg.vocab_size, table.shape, generator=g))
    run = directory / name
    save_bundle(run / "model.safetensors", model.state_dict(), cfg, step=0)
    return run


def wav(seconds: float, seed: int) -> torch.Tensor:
    """A chirp in noise, (N,) float32 at 16 kHz."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * torch.pi * (150 + 400 * t) * t) + 0.05 * torch.randn(t.shape, generator=g)
