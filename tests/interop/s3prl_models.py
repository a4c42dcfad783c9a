"""Tiny aviary bundles of every family, for the s3prl upstream-package tests.

Random weights (seeded) with every parameter moved away from its initial value, so that
LayerNorms, biases and the token table all matter. Each bundle is what ``aviary pretrain``
leaves in a run directory (``save_bundle`` of the pretraining model's state dict).
"""
from __future__ import annotations

from pathlib import Path

import torch

from aviary.config import apply_overrides
from aviary.hub import save_bundle
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


def write_corpus(root: Path, n: int = 16, seed: int = 0) -> Path:
    """``n`` noisy-sine wav files (0.6 .. 1.6 s, 4 speakers) with train/valid/test splits."""
    import numpy as np
    import soundfile as sf

    from aviary.data.manifest import Utterance, write_corpus as _write

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(n):
        t = np.arange(int(rng.uniform(0.6, 1.6) * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + rng.normal(0, 0.02, t.size)
        path = root / f"u{i:03d}.wav"
        sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")
        utts.append(Utterance(id=f"u{i:03d}", audio=str(path), duration=t.size / 16000, sample_rate=16000,
                              speaker=f"s{i % 4}"))
    _write(root, utts, readme="noisy sines for the s3prl upstream tests")
    return root


FAST = ["train.precision=fp32", "train.log_every=1", "train.val_every=0", "train.tensorboard=false",
        "train.warmup_fraction=0", "train.max_batch_seconds=4", "train.crop_seconds=1.2"]


def pretrain_runs(root: Path) -> dict[str, Path]:
    """Real ``aviary pretrain`` runs (2 steps, through the CLI) of issue 19's three models:
    an R = 3 AALBERT, an SSAST frame model, and token-BERT on tokens of a vq-wav2vec run."""
    from aviary.cli import main

    corpus = write_corpus(root / "corpus")
    runs = {"aalbert-R3": root / "aalbert", "ssast-frame": root / "ssast", "token-bert": root / "bert"}
    assert main(["pretrain", "--model", "aalbert-tiny", "--data", str(corpus), "--out", str(runs["aalbert-R3"]),
                 "--steps", "2", *FAST]) == 0
    assert main(["pretrain", "--model", "ssast-frame-cpu", "--data", str(corpus), "--out", str(runs["ssast-frame"]),
                 "--steps", "2", *FAST, *[f"model.{o}" for o in TINY_SSAST]]) == 0
    vq, tokens = root / "vq", root / "tokens"
    assert main(["pretrain", "--model", "vq-wav2vec-kmeans-cpu", "--data", str(corpus), "--out", str(vq),
                 "--steps", "2", *FAST, *[f"model.{o}" for o in TINY_VQ]]) == 0
    assert main(["tokenize", "--checkpoint", str(vq), "--data", str(corpus), "--out", str(tokens)]) == 0
    bert = [f"model.{o}" for o in MODELS["token-bert"][1]]
    assert main(["pretrain", "--model", "token-bert-cpu", "--data", str(tokens), "--out", str(runs["token-bert"]),
                 "--steps", "2", *FAST[:5], *bert, "train.max_batch_tokens=256"]) == 0
    return runs
