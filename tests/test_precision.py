"""One precision setting everywhere: `auto` is bf16 only where it is native (issue 14).

The CPU flag detection is mocked both ways (AMX-BF16 present / absent) and every command
(pretrain, extract, probe, analyze attention, demo) must resolve `auto` accordingly and
write the resolved choice into what it records.
"""
import json
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from aviary import precision as P
from aviary.cli import main
from aviary.config import ConfigError

AMX = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX2 = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
CPUS = {"amx": (AMX, "bf16"), "avx2": (AVX2, "fp32")}


@pytest.fixture(scope="module")
def sine_corpus(tmp_path_factory):
    """12 short noisy sines (4 speakers) with train / valid / test splits."""
    from aviary.data.manifest import Utterance, write_corpus

    root = tmp_path_factory.mktemp("sines")
    rng = np.random.default_rng(0)
    utts = []
    for i in range(12):
        t = np.arange(int(rng.uniform(0.4, 1.0) * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + rng.normal(0, 0.02, t.size)
        sf.write(root / f"u{i:02d}.wav", wav.astype(np.float32), 16000, subtype="PCM_16")
        utts.append(Utterance(id=f"u{i:02d}", audio=str(root / f"u{i:02d}.wav"), duration=t.size / 16000,
                              sample_rate=16000, speaker=f"s{i % 4}"))
    write_corpus(root, utts, readme="noisy sines")
    return root


@pytest.fixture(params=sorted(CPUS))
def cpu(request, monkeypatch):
    """Pretend to run on a CPU with (amx) or without (avx2) native bf16; yields what auto gives."""
    flags, expected = CPUS[request.param]
    monkeypatch.setattr(P, "cpu_flags", lambda path="/proc/cpuinfo": flags)
    monkeypatch.setattr(P, "kernels_allow_bf16", lambda: True)  # whatever the test machine's torch allows
    return expected


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU avx512_bf16 in its name\n"
                    "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f\n")
    assert P.cpu_flags(str(info)) == {"fpu", "avx2", "avx512f"}  # not the model name's words
    amx = tmp_path / "cpuinfo-amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert "amx_bf16" in P.cpu_flags(str(amx))
    assert P.cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize("flags,native", [(AMX, True), (AVX2, False), (frozenset({"avx512_bf16"}), True),
                                          (frozenset({"amx_bf16"}), True), (frozenset(), False)])
def test_cpu_supports_bf16(monkeypatch, flags, native):
    monkeypatch.setattr(P, "cpu_flags", lambda path="/proc/cpuinfo": flags)
    monkeypatch.setattr(P, "kernels_allow_bf16", lambda: True)
    assert P.cpu_supports_bf16() is native
    # Flags alone are not enough: torch held to AVX2 emulates bf16 even on an AMX CPU.
    monkeypatch.setattr(P, "kernels_allow_bf16", lambda: False)
    assert P.cpu_supports_bf16() is False


@pytest.mark.parametrize("capability,isa,allowed", [
    ("AVX512", None, True), ("AVX512", "AVX512_CORE_AMX", True), ("AVX512", "ALL", True),
    ("AVX512", "avx2", False), ("AVX512", "AVX512_CORE", False), ("AVX2", None, False), ("DEFAULT", None, False)])
def test_kernels_allow_bf16(monkeypatch, capability, isa, allowed):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert P.kernels_allow_bf16() is allowed


def test_auto_is_fp32_when_torch_is_held_to_avx2():
    """A fresh process with ATEN_CPU_CAPABILITY=avx2: auto resolves to fp32 on any CPU."""
    import subprocess
    import sys

    code = "import aviary.precision as P; print(P.resolve_precision('auto', 'cpu'))"
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


def test_resolve_on_cpu(cpu, caplog):
    assert P.resolve_precision("auto", "cpu") == cpu
    assert P.resolve_precision("auto", torch.device("cpu"), loss_scaling=True) == cpu
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING, logger="aviary.precision"):
        P._warn_emulated_bf16.cache_clear()
        assert P.resolve_precision("bf16", "cpu") == "bf16"  # asked for: honoured
    # ... with a warning only where bf16 is emulated
    assert ("emulated" in caplog.text) is (cpu == "fp32")
    with pytest.raises(ConfigError, match="'fp16' is invalid on CPU"):
        P.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="allowed auto, fp32, bf16, fp16"):
        P.resolve_precision("half", "cpu")
    assert P.precision_record("auto", "cpu") == {"precision": cpu, "precision_requested": "auto"}


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_resolve_on_cuda(monkeypatch, bf16_gpu):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    # fp16 only for callers that scale the loss (pretraining); probes fall back to fp32.
    assert P.resolve_precision("auto", "cuda", loss_scaling=True) == ("bf16" if bf16_gpu else "fp16")
    assert P.resolve_precision("auto", "cuda:0") == ("bf16" if bf16_gpu else "fp32")
    assert P.resolve_precision("fp16", "cuda") == "fp16"


def test_autocast_context(cpu):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with P.autocast_context("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with P.autocast_context("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with P.autocast_context("auto", torch.device("cpu")):
        assert (a @ b).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[cpu]
    with pytest.raises(ConfigError):
        P.autocast_context("fp16", "cpu")


def test_legacy_autocast_names():
    assert P.from_legacy_autocast("none") == "fp32" and P.from_legacy_autocast("bf16") == "bf16"
    with pytest.raises(ConfigError, match="autocast"):
        P.from_legacy_autocast("fp16")


def test_this_machine_picks_its_native_precision():
    """On this machine (the CPU named in /proc/cpuinfo) auto follows its own flags."""
    P.cpu_flags.cache_clear()
    native = ("amx_bf16" in P.cpu_flags() or "avx512_bf16" in P.cpu_flags()) and P.kernels_allow_bf16()
    assert P.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


# ------------------------------------------------------------------------------- commands


def test_pretrain_records_resolved_precision(cpu, sine_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "mockingjay-tiny", "--data", str(sine_corpus), "--out", str(out),
                 "--steps", "2", "train.log_every=1", "train.val_every=0", "train.tensorboard=false",
                 "train.max_batch_seconds=3", "train.crop_seconds=1"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["precision"] == cpu and run["precision_requested"] == "auto" and run["train"]["precision"] == "auto"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["precision"] == cpu for m in metrics if "split" not in m)
    # --precision sets train.precision; fp16 on a CPU is refused with the key named.
    out2 = tmp_path / "run2"
    assert main(["pretrain", "--model", "mockingjay-tiny", "--data", str(sine_corpus), "--out", str(out2),
                 "--steps", "1", "--precision", "fp32", "train.val_every=0", "train.tensorboard=false",
                 "train.max_batch_seconds=3", "train.crop_seconds=1"]) == 0
    assert json.loads((out2 / "run.json").read_text())["precision"] == "fp32"
    assert main(["pretrain", "--model", "mockingjay-tiny", "--data", str(sine_corpus), "--out",
                 str(tmp_path / "run3"), "--steps", "1", "--precision", "fp16"]) == 2


def test_extract_and_probe_record_resolved_precision(cpu, sine_corpus, tmp_path):
    cache = tmp_path / "cache"
    assert main(["extract", "--checkpoint", "random:mockingjay-tiny", "--data", str(sine_corpus),
                 "--out", str(cache), "--layers", "last"]) == 0
    idx = json.loads((cache / "index.json").read_text())
    assert idx["precision"] == cpu and idx["precision_requested"] == "auto"
    out = tmp_path / "probes"
    assert main(["probe", "--upstream", "random:mockingjay-tiny", "--data", str(sine_corpus), "--task", "speaker",
                 "--head", "linear,mlp1", "--cache", str(cache), "--out", str(out), "--steps", "5"]) == 0
    from aviary.evaluate.results import load_records

    recs = {r["head"]: r for r in load_records(out)}
    # The AdamW-trained head runs in the resolved precision; the solved linear probe is fp32
    # whatever was asked (L-BFGS on standardised features, scored as solved).
    assert recs["mlp1"]["precision"] == cpu and recs["linear"]["precision"] == "fp32"
    for rec in recs.values():
        assert rec["precision_requested"] == "auto" and rec["extract_precision"] == cpu
        assert "precision" not in rec["key"]


def test_extract_precision_explicit_and_legacy_alias(cpu, sine_corpus, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        assert main(["extract", "--checkpoint", "fbank", "--data", str(sine_corpus), "--out", str(cache),
                     "--autocast", "none"]) == 0
    assert "deprecated" in caplog.text
    assert json.loads((cache / "index.json").read_text())["precision"] == "fp32"
    # Re-running in another resolved precision would mix precisions in one cache: refused.
    assert main(["extract", "--checkpoint", "fbank", "--data", str(sine_corpus), "--out", str(cache),
                 "--precision", "bf16"]) == 2
    assert main(["extract", "--checkpoint", "fbank", "--data", str(sine_corpus), "--out", str(cache),
                 "--precision", "fp32"]) == 0
    assert main(["extract", "--checkpoint", "fbank", "--data", str(sine_corpus), "--out", str(tmp_path / "c2"),
                 "--precision", "fp16"]) == 2


def test_analyze_attention_records_resolved_precision(cpu, tmp_path, tiny_aalbert):
    ckpt, manifest = tiny_aalbert()
    args = ["analyze", "attention", "--checkpoint", str(ckpt), "--data", str(manifest)]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    d = json.loads((tmp_path / "a" / "attention_jsd.json").read_text())
    assert d["precision"] == cpu and d["precision_requested"] == "auto"
    assert main(args + ["--out", str(tmp_path / "b"), "--precision", "fp32"]) == 0
    assert json.loads((tmp_path / "b" / "attention_jsd.json").read_text())["precision"] == "fp32"
    assert main(args + ["--out", str(tmp_path / "c"), "--autocast", "bf16", "--precision", "fp32"]) == 2


def test_demo_uses_one_precision_for_every_stage(cpu, monkeypatch, tmp_path):
    """DemoConfig.precision reaches pretraining, extraction and the probes (the stages are
    stubbed where they would train; the whole demo runs in tests/test_demo.py)."""
    import aviary
    import aviary.evaluate.sweep as sweep
    from aviary.analysis import demo

    cfg = demo.DemoConfig.quick()
    assert cfg.precision == "auto" and not hasattr(cfg, "probe_autocast")
    assert P.resolve_precision(demo.train_config(cfg).precision, "cpu") == cpu
    calls = []
    monkeypatch.setattr(sweep, "run_sweep", lambda up, data, **kw: calls.append(kw))
    monkeypatch.setattr(aviary, "load", lambda path: object())
    monkeypatch.setattr(demo, "_random_upstream", lambda c, seed=None: object())
    demo.run_probes(cfg, tmp_path, tmp_path / "runs", tmp_path / "probes")
    assert calls and all(kw["overrides"]["precision"] == "auto" and kw["extract"]["precision"] == "auto"
                         for kw in calls)
    with pytest.raises(ConfigError, match="precision"):
        demo.DemoConfig(precision="bf17")
    # A demo directory from before issue 14 (two autocast keys in its state) still resumes.
    legacy = {**cfg.to_dict(), "probe_autocast": "bf16", "extract_autocast": "bf16"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "demo_state.json").write_text(json.dumps({"config": legacy}))
    monkeypatch.setattr(demo, "ensure_corpus", lambda c, out: (_ for _ in ()).throw(RuntimeError("reached")))
    with pytest.raises(RuntimeError, match="reached"):
        demo.run_demo(tmp_path / "old", cfg)


def test_finetune_probe_records_resolved_precision(cpu, sine_corpus, tmp_path):
    from aviary.evaluate.sweep import run_sweep

    (rec,) = run_sweep("random:mockingjay-tiny", sine_corpus, tmp_path / "ft", tasks=["speaker"], layers="last",
                       finetune=True, overrides={"steps": 5, "batch_seconds": 4.0}, progress=False)
    assert rec["mode"] == "finetune" and rec["precision"] == cpu and rec["extract_precision"] is None


def test_old_records_and_overrides_with_autocast_are_read_as_precision(tmp_path, caplog):
    """results.jsonl written before issue 14: `autocast` in the config and (when not the
    default) in the key. They load with `precision`, under today's key, so a resumed sweep
    skips them instead of probing again."""
    from aviary.evaluate.probe import ProbeConfig, probe_key, upgrade_legacy
    from aviary.evaluate.results import append_record, load_records

    new = ProbeConfig(task="phone", head="linear", layer="2", precision="bf16")
    old_config = {k: v for k, v in new.to_dict().items() if k != "precision"}
    key = probe_key("aa", new)
    for autocast in ("bf16", "none"):
        append_record(tmp_path / autocast, {"key": f"{key}|autocast={autocast}" if autocast != "none" else key,
                                            "config": {**old_config, "autocast": autocast}, "task": "phone"})
        (rec,) = load_records(tmp_path / autocast)
        want = {"bf16": "bf16", "none": "fp32"}[autocast]
        assert rec["key"] == key and rec["precision"] == want and rec["config"]["precision"] == want
        assert ProbeConfig.from_dict({**old_config, "autocast": autocast}).precision == want
    with caplog.at_level(logging.WARNING):
        assert upgrade_legacy({"autocast": "none", "lr": 0.1}) == {"precision": "fp32", "lr": 0.1}
    assert "deprecated" in caplog.text
    with pytest.raises(ConfigError, match="disagree"):
        upgrade_legacy({"autocast": "bf16", "precision": "fp32"})
