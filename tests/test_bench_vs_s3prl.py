"""The pieces of benchmarks/bench_vs_s3prl.py and bench_mam's speed-up run, at toy sizes, without s3prl."""
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_vs_s3prl as vs  # noqa: E402
from benchmarks.bench_mam import bench_speedup  # noqa: E402
from aviary.models.registry import get_preset  # noqa: E402


def _job(tmp_path, side, **kw):
    cfg = get_preset("mockingjay-tiny")
    return {"config": cfg.to_dict(), "threads": 1, "side": side, "dtype": "fp32", "batch": 2,
            "samples": 3200, "warmup": 1, "steps": 1, **kw}


def test_aviary_train_worker_reports_throughput_against_the_peak(tmp_path):
    res = vs.run_worker(_job(tmp_path, "aviary-train"))
    assert res["frames"] == 2 * 21 and res["params"] > 0
    assert res["step_s"] > 0 and res["gflop_s"] > 0 and 0 < res["fraction_of_peak"] < 10
    assert res["matmul_peak_gflop_s"]["fp32"]["wall_gflop_s"] > 0 and len(res["load_average"]) == 3


def test_aviary_extract_worker_on_an_exported_bundle(tmp_path):
    cfg = get_preset("mockingjay-tiny")
    bundle, ckpt, n_params = vs._prepare(tmp_path, cfg)
    assert ckpt.is_file() and n_params > 0
    res = vs.run_worker(_job(tmp_path, "aviary-extract", bundle=str(bundle), samples=16000))
    assert res["states"] == cfg.encoder.num_layers + 1 and res["frames"] == 2 * 101
    assert res["gflop_s"] > 0


def test_plan_alternates_s3prl_and_aviary_and_filters():
    args = types.SimpleNamespace(only=None)
    labels = [p[0] for p in vs.plan(args, bf16=True)]
    assert labels == ["s3prl-train-fp32", "aviary-train-fp32", "aviary-train-bf16", "s3prl-extract-fp32",
                      "aviary-extract-fp32"]
    assert "aviary-train-bf16" not in [p[0] for p in vs.plan(args, bf16=False)]
    assert [p[0] for p in vs.plan(types.SimpleNamespace(only=["extract"]), bf16=True)] == [
        "s3prl-extract-fp32", "aviary-extract-fp32"]


def test_torchaudio_shim_matches_aviarys_front_end_pieces(monkeypatch):
    """The shim's MelScale / compute_deltas (used by s3prl's preprocessor) equal aviary's helpers."""
    from aviary.features.spectral import deltas, mel_filterbank

    monkeypatch.setitem(sys.modules, "torchaudio", types.ModuleType("torchaudio"))
    for name in ("torchaudio.transforms", "torchaudio.functional", "torchaudio.compliance",
                 "torchaudio.compliance.kaldi"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    vs.torchaudio_shim()
    ta = sys.modules["torchaudio"]
    spec = torch.rand(2, 201, 30)
    mel = ta.transforms.MelScale(n_mels=80, sample_rate=16000)(spec)
    torch.testing.assert_close(mel, (spec.transpose(1, 2) @ mel_filterbank(16000, 400, 80)).transpose(1, 2))
    x = torch.randn(2, 30, 80)  # (B, T, D)
    d = ta.functional.compute_deltas(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(d, deltas(x, torch.tensor([30, 30])), rtol=1e-5, atol=1e-5)
    mfcc = ta.transforms.MFCC(sample_rate=16000, n_mfcc=13, log_mels=True,
                              melkwargs={"n_fft": 400, "hop_length": 160, "win_length": 400})
    assert mfcc(torch.randn(2, 1, 16000)).shape == (2, 1, 13, 101)
    with pytest.raises(NotImplementedError, match="shim"):
        ta.transforms.Spectrogram()(torch.randn(100))


def test_bench_mam_speedup_runs_every_variant_at_toy_size():
    res = bench_speedup("mockingjay-tiny", bf16=False, batch=1, seconds=0.5, steps=1, rounds=2,
                        variants=("before", "after"))
    assert set(res["frames_per_s"]) == {"before", "after"} and len(res["step_s"]["after"]) == 2
    assert res["speedup_vs_before"]["before"] == 1.0 and res["speedup_vs_before"]["after"] > 0
