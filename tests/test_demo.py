"""The whole study end to end at toy size: summary keys, every figure embedded, resumability."""
import base64
import json
import re
import subprocess
import sys

import pytest

from aviary.analysis.demo import DemoConfig, model_configs, run_demo
from aviary.precision import resolve_precision


def _check_outputs(out):
    summary = json.loads((out / "summary.json").read_text())
    for key in ("corpus", "models", "probes"):
        assert key in summary
    for key in ("utterances", "speakers", "hours"):
        assert summary["corpus"][key] > 0
    assert set(summary["models"]) == {"mockingjay", "aalbert"}
    for m in summary["models"].values():
        for key in ("params", "pretrain_steps", "pretrain_seconds", "final_train_loss", "final_valid_loss"):
            assert m[key] is not None, key
    # Same shape, shared layers: AALBERT has fewer parameters.
    assert summary["models"]["aalbert"]["params"] < summary["models"]["mockingjay"]["params"]
    ups = {r["upstream"] for r in summary["probes"]}
    assert {"mockingjay", "aalbert", "random-init", "logmel"} <= ups
    assert {r["layer"] for r in summary["probes"] if r["upstream"] == "aalbert"} >= {0, 1, 2, "weighted"}
    assert {r["task"] for r in summary["probes"]} == {"phone", "speaker"}
    assert summary["findings"]
    # One precision, resolved per machine (auto: bf16 only where native), in every stage's record.
    native = resolve_precision("auto", "cpu")
    assert summary["demo"]["precision"] == native and summary["demo"]["precision_requested"] == "auto"
    assert all(m["precision"] == native for m in summary["models"].values())
    # Solved linear probes are exact float32 problems (evaluate/solver.py), whatever the machine.
    assert all(r["precision"] == ("fp32" if r["solver"] == "lbfgs" else native) for r in summary["probes"])
    assert any(r["solver"] == "lbfgs" for r in summary["probes"])
    assert all(r["extract_precision"] == native for r in summary["probes"] if r["mode"] == "frozen")
    html = (out / "report.html").read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 4, "probing, weights, JSD and spectrogram figures must all be embedded"
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "not produced" not in html
    return summary


def test_paired_models_differ_only_in_sharing():
    cfgs = model_configs(DemoConfig())
    mj, aa = cfgs["mockingjay"].to_dict(), cfgs["aalbert"].to_dict()
    assert mj["encoder"].pop("share_layers") is False and aa["encoder"].pop("share_layers") is True
    mj.pop("variant"), aa.pop("variant")
    assert mj == aa


def test_optional_models_share_mockingjays_encoder():
    # models=...,bestrq,hubert: the masked-prediction objectives on exactly Mockingjay's encoder
    # (shape, unshared layers, ALiBi, R), each with its own front-end and objective.
    cfgs = model_configs(DemoConfig(models=("mockingjay", "aalbert", "bestrq", "hubert")))
    assert list(cfgs) == ["mockingjay", "aalbert", "bestrq", "hubert"]
    for name in ("bestrq", "hubert"):
        assert cfgs[name].encoder == cfgs["mockingjay"].encoder
        assert cfgs[name].variant == name and type(cfgs[name].objective).__name__.lower().startswith(name)
    assert set(model_configs(DemoConfig())) == {"mockingjay", "aalbert"}
    for bad in (("aalbert", "bestrq"), ("mockingjay", "aalbert", "wav2vec"), ("mockingjay", "aalbert", "aalbert")):
        with pytest.raises(ValueError, match="models"):
            DemoConfig(models=bad).validate()


@pytest.mark.slow
def test_micro_demo_with_masked_prediction_models(tmp_path):
    cfg = DemoConfig.quick().replace(speakers=4, utterances_per_speaker=6, steps=4, phone_heads=["linear"],
                                     speaker_heads=[], baselines=[], random_init=False, probe_steps=2,
                                     jsd_utterances=2, val_batches=1, hubert_clusters=8,
                                     models=["mockingjay", "aalbert", "bestrq", "hubert"])
    out = tmp_path / "demo"
    summary = run_demo(out, cfg)
    assert set(summary["models"]) == {"mockingjay", "aalbert", "bestrq", "hubert"}
    for name in ("bestrq", "hubert"):
        m = summary["models"][name]
        assert m["plateau"].startswith("the code-frequency") and m["plateau_loss"] > 0 and m["learned"] is not None
        layers = {r["layer"] for r in summary["probes"] if r["upstream"] == name}
        assert layers >= {0, 1, "weighted"}, (name, layers)
    assert (out / "runs" / "targets-mfcc").is_dir()  # HuBERT's k-means targets, made once
    rows = {r["upstream"]: r for r in summary["key_results"]}
    assert rows["bestrq"]["phone_linear"] is not None and rows["hubert"]["role"] in ("pretrained", "not learned")


@pytest.mark.slow
def test_micro_demo_and_resume(tmp_path):
    cfg = DemoConfig.quick().replace(speakers=4, utterances_per_speaker=6, steps=4, phone_heads=["linear"],
                                     baselines=["logmel"], probe_steps=2, jsd_utterances=2, val_batches=1)
    out = tmp_path / "demo"
    run_demo(out, cfg)
    _check_outputs(out)
    n_records = len((out / "probes" / "results.jsonl").read_text().splitlines())
    mtime = (out / "runs" / "aalbert" / "model.safetensors").stat().st_mtime
    run_demo(out, cfg)  # resumes: nothing is retrained or re-probed
    assert len((out / "probes" / "results.jsonl").read_text().splitlines()) == n_records
    assert (out / "runs" / "aalbert" / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="other settings"):
        run_demo(out, cfg.replace(steps=5))
    # More seeds extend it: the first seed's runs and probes are reused, the second's are added.
    summary = run_demo(out, cfg.replace(seeds=2))
    assert (out / "runs" / "aalbert" / "model.safetensors").stat().st_mtime == mtime
    assert (out / "runs" / "aalbert-s1" / "model.safetensors").is_file()
    assert {r["upstream"] for r in summary["probes"]} >= {"aalbert", "aalbert-s1", "mockingjay-s1"}
    with pytest.raises(ValueError, match="only --seeds may grow"):
        run_demo(out, cfg)  # fewer seeds than the directory holds


@pytest.mark.slow
def test_quick_demo_cli(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "aviary", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Key results" in proc.stdout and "aalbert" in proc.stdout
    _check_outputs(out)


def test_seed_runs_names_and_learning_curve_checkpoints():
    from aviary.analysis.demo import base_name, learned, seed_runs, train_config

    cfg = DemoConfig(seed=5, seeds=3)
    assert seed_runs(cfg) == [(5, ""), (6, "-s6"), (7, "-s7")]
    assert base_name("aalbert-s6") == "aalbert" and base_name("random-init") == "random-init"
    assert base_name("random-init-s7") == "random-init" and base_name("fbank") == "fbank"
    # The learning curve's points are checkpoints, and all of them are kept.
    t = train_config(cfg.replace(steps=600, learning_curve_points=4), seed=6)
    assert t.seed == 6 and t.checkpoint_every == 150 and t.keep_last >= 5
    assert train_config(cfg.replace(learning_curve_points=0)).keep_last == 2
    # Audio ALBERT's own peak lr; every other model (and no model named) gets lr.
    assert train_config(cfg, model="aalbert").lr == cfg.aalbert_lr == 1e-3
    assert train_config(cfg, model="mockingjay").lr == train_config(cfg).lr == cfg.lr == 5e-4
    assert train_config(cfg.replace(aalbert_lr=None), model="aalbert").lr == 5e-4
    # Learned = final L1 at most learned_ratio of the utterance-mean predictor's.
    assert learned({"loss": 0.56, "l1_utt_mean": 0.79}, 0.85) == (True, 0.56 / 0.79)
    assert learned({"loss": 0.75, "l1_utt_mean": 0.79}, 0.85)[0] is False
    assert learned({"loss": 0.75}, 0.85) == (None, None)
    # Masked prediction: judged against the split's unigram level, never the loop's per-batch
    # entropy (biased low: a BEST-RQ run at 0.82 of the split's level read as 1.003 of it).
    mp = {"loss": 4.06, "ce": 4.06, "unigram_ce": 4.05}
    assert learned(mp, 0.85) == (None, None)
    assert learned(mp, 0.85, unigram_ce=4.96) == (True, 4.06 / 4.96)


def test_learning_curve_reads_checkpoint_and_final_records_apart():
    from aviary.analysis.demo import curve_from_records

    def rec(up, layer, valid, test, frac):
        return {"upstream": up, "task": "phone", "head": "linear", "layer": layer, "mode": "frozen",
                "label_fraction": frac, "valid_acc": valid, "test_acc": test}

    # Checkpoints are probed at fraction 1 of the curve corpus, the final models at 0.3: the
    # final point must still be found (a mixed "largest fraction" filter dropped it).
    recs = [rec("mockingjay@150", 0, 0.50, 0.49, 1.0), rec("mockingjay@150", 1, 0.52, 0.51, 1.0),
            rec("mockingjay", 0, 0.50, 0.50, 0.3), rec("mockingjay", 1, 0.57, 0.56, 0.3),
            rec("aalbert@150", 0, 0.53, 0.53, 1.0), rec("aalbert", 2, 0.55, 0.54, 0.3),
            rec("random-init", 0, 0.53, 0.52, 0.3), rec("logmel", 0, 0.48, 0.47, 0.3)]
    c = curve_from_records(recs, [150, 600], ("logmel",))
    assert c["steps"] == [150, 600]
    assert c["models"] == {"mockingjay": [0.51, 0.56], "aalbert": [0.53, 0.54]}
    assert c["random_init"] == 0.52 and c["baseline"] == ("logmel", 0.47)
