"""BEST-RQ and HuBERT-style targets through the command line, end to end (issue 20): make the
targets, pretrain, then extract and probe the runs exactly like any other upstream."""
import pytest
import torch

import aviary
from aviary.cli import main
from aviary.evaluate.results import load_records

TINY = ["model.encoder.hidden_size=32", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ffn_size=64"]
FAST = ["train.log_every=1", "train.val_every=0", "train.tensorboard=false", "train.warmup_fraction=0",
        "train.max_batch_seconds=4", "train.crop_seconds=2", "train.precision=fp32"]


@pytest.mark.parametrize("preset", ["bestrq-cpu", "hubert-cpu"])
def test_targets_pretrain_extract_probe(corpus, tmp_path, preset):
    torch.manual_seed(0)
    run = tmp_path / "run"
    extra = []
    if preset.startswith("hubert"):
        targets = tmp_path / "targets"
        assert main(["targets", "kmeans", "--features", "mfcc", "--clusters", "8", "--downsample", "3",
                     "--data", str(corpus), "--out", str(targets)]) == 0
        extra = ["--targets", str(targets)]
    assert main(["pretrain", "--model", preset, "--data", str(corpus), "--out", str(run), "--steps", "2",
                 *extra, *TINY, *FAST]) == 0
    if preset.startswith("hubert"):  # iteration 1: the k-means of a layer of the trained model
        assert main(["targets", "kmeans", "--features", f"{run}:1", "--clusters", "4", "--data", str(corpus),
                     "--out", str(tmp_path / "it1")]) == 0
        assert main(["targets", "kmeans", "--features", f"{run}:1", "--downsample", "3", "--clusters", "4",
                     "--data", str(corpus), "--out", str(tmp_path / "it1b")]) == 2  # its own frame rate
    up = aviary.load(run)
    assert up.num_hidden_states == 3 and up.frame_shift == pytest.approx(0.03)
    cache = tmp_path / "cache"
    assert main(["extract", "--checkpoint", str(run), "--data", str(corpus), "--out", str(cache),
                 "--dtype", "float32"]) == 0
    out = tmp_path / "probes"
    assert main(["probe", "--upstream", str(run), "--data", str(corpus), "--task", "phone,speaker",
                 "--head", "linear", "--layers", "all", "--cache", str(cache), "--out", str(out),
                 "--steps", "5"]) == 0
    recs = load_records(out)
    assert {(r["task"], r["layer"]) for r in recs} == {(t, l) for t in ("phone", "speaker") for l in (0, 1, 2)}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in recs)
