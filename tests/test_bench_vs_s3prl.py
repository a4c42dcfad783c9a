"""The pieces of benchmarks/bench_vs_s3prl.py and bench_mam's speed-up run, at toy sizes, without s3prl
(but for the slow test of the s3prl extraction worker)."""
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import bench_vs_s3prl as vs  # noqa: E402
from benchmarks.bench_mam import bench_speedup  # noqa: E402
from aviary.config import apply_overrides  # noqa: E402
from aviary.interop.s3prl import config_to_s3prl  # noqa: E402
from aviary.models.registry import get_preset  # noqa: E402

# Test-sized stand-ins of EXTRACT_MODELS (their s3prl entries, R = 1 like the benchmark's).
TINY = {"mockingjay": get_preset("mockingjay-tiny"),
        "aalbert": apply_overrides(get_preset("aalbert-tiny"), {"encoder.downsample": 1, "masking.span": 7})}


def _job(tmp_path, side, **kw):
    cfg = get_preset("mockingjay-tiny")
    return {"config": cfg.to_dict(), "threads": 1, "side": side, "dtype": "fp32", "batch": 2,
            "samples": 3200, "warmup": 1, "steps": 1, **kw}


def test_aviary_train_worker_reports_throughput_against_the_peak(tmp_path):
    res = vs.run_worker(_job(tmp_path, "aviary-train"))
    assert res["frames"] == 2 * 21 and res["params"] > 0
    assert res["step_s"] > 0 and res["gflop_s"] > 0 and 0 < res["fraction_of_peak"] < 10
    assert res["matmul_peak_gflop_s"]["fp32"]["wall_gflop_s"] > 0 and len(res["load_average"]) == 3


@pytest.mark.parametrize("name", list(TINY))
def test_aviary_extract_worker_on_an_exported_bundle(tmp_path, name):
    cfg = TINY[name]
    prep = vs._prepare(tmp_path, name, cfg)
    assert prep["ckpt"].is_file() and prep["ckpt"].name == f"{name}.ckpt"
    assert 0 < prep["upstream_params"] < prep["params"]
    res = vs.run_worker({**_job(tmp_path, "aviary-extract", bundle=str(prep["bundle"]), samples=16000),
                         "config": cfg.to_dict()})
    assert res["states"] == cfg.encoder.num_layers + 1 and res["frames"] == 2 * 101
    assert res["params"] == prep["upstream_params"] and res["gflop_s"] > 0


def test_extract_models_are_what_s3prls_upstreams_compute():
    """Every pair's aviary config exports at R = 1 (s3prl's upstreams ignore downsample_rate),
    Audio ALBERT with shared layers, and names a ``<package>_local`` entry of ``s3prl.upstream.<package>``."""
    assert list(vs.EXTRACT_MODELS) == ["mockingjay", "aalbert"] and vs.EXTRACT_MODELS[vs.TRAIN_MODEL][0] == vs.PRESET
    for name, (preset, _, module, entry) in vs.EXTRACT_MODELS.items():
        cfg = vs.model_config(name)
        tr = config_to_s3prl(cfg)["transformer"]
        assert tr["downsample_rate"] == 1 and tr["share_layer"] is (name == "aalbert"), name
        assert (tr["hidden_size"], tr["num_hidden_layers"]) == (768, 3) and cfg.encoder.num_heads == 12
        assert module == f"s3prl.upstream.{entry.removesuffix('_local')}.hubconf"
    assert get_preset("aalbert-3l").encoder.downsample == 3  # hence the override


def test_plan_alternates_s3prl_and_aviary_and_filters():
    args = types.SimpleNamespace(only=None, extract_models=list(vs.EXTRACT_MODELS))
    steps = vs.plan(args, bf16=True)
    assert [p[0] for p in steps] == [
        "s3prl-train-fp32", "aviary-train-fp32", "aviary-train-bf16",
        "s3prl-extract-mockingjay-fp32", "aviary-extract-mockingjay-fp32",
        "s3prl-extract-aalbert-fp32", "aviary-extract-aalbert-fp32"]
    assert {p[3] for p in steps[:3]} == {vs.TRAIN_MODEL} and [p[3] for p in steps[5:]] == ["aalbert"] * 2
    assert "aviary-train-bf16" not in [p[0] for p in vs.plan(args, bf16=False)]
    only = types.SimpleNamespace(only=["extract"], extract_models=["aalbert"])
    assert [p[:2] for p in vs.plan(only, bf16=True)] == [
        ("s3prl-extract-aalbert-fp32", "s3prl-extract"), ("aviary-extract-aalbert-fp32", "aviary-extract")]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_s3prl_extract_worker_loads_the_export_in_its_upstream(tmp_path, name):
    """s3prl's ``mockingjay_local`` / ``audio_albert_local`` (s3prl 0.4.18's venv) on the export:
    aviary's parameter count, number of hidden states and frames, and the same last state."""
    from benchmarks.s3prl_env import S3prlEnvError, ensure_s3prl_env, s3prl_env_vars

    try:
        python = str(ensure_s3prl_env())
    except (S3prlEnvError, OSError) as e:
        pytest.skip(f"no s3prl environment: {e}")
    cfg = TINY[name]
    prep = vs._prepare(tmp_path, name, cfg)
    job = {**_job(tmp_path, "s3prl-extract", samples=16000), "config": cfg.to_dict(),
           "s3prl_ckpt": str(prep["ckpt"]), "s3prl_upstream": vs.EXTRACT_MODELS[name][2:]}
    res = vs._spawn(python, job, s3prl_env_vars(), timeout=600)
    ref = vs.run_worker({**job, "side": "aviary-extract", "bundle": str(prep["bundle"])})
    assert res["params"] == ref["params"] == prep["upstream_params"]
    assert res["states"] == ref["states"] == cfg.encoder.num_layers + 1 and res["frames"] == ref["frames"]
    assert res["last_mean_abs"] == pytest.approx(ref["last_mean_abs"], rel=1e-4)


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
