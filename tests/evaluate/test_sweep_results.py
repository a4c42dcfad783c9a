"""Sweeps (resume without duplicates), results files and plots, the baselines, the CLI."""
import json

import numpy as np
import pytest
import torch

from aviary.cli import main
from aviary.evaluate import sweep as sweep_mod
from aviary.evaluate.results import append_record, load_records, summarize
from aviary.evaluate.sweep import expand_layers, run_sweep
from aviary.evaluate.upstreams import FeatureUpstream, resolve_upstream

from evaluate_fakes import H, OracleUpstream

FAST = {"steps": 30, "patience": 3, "lr": 1e-2, "batch_frames": 512}


def test_expand_layers():
    assert expand_layers("all", 3) == [0, 1, 2]
    assert expand_layers("all,weighted", 3) == [0, 1, 2, "weighted"]
    assert expand_layers("last,1,1", 3) == ["last", 1]
    with pytest.raises(ValueError, match="out of range"):
        expand_layers("3", 3)


def test_sweep_resumes_without_duplicates(corpus, oracle_cache, tmp_path, monkeypatch):
    out = tmp_path / "probes"
    grid = dict(tasks=["phone", "speaker"], heads=["linear", "mlp1"], layers="all,weighted",
                overrides={**FAST, "hidden": 16}, progress=False)
    real = sweep_mod.run_probe
    calls = {"n": 0}

    def dying_probe(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed during the fifth probe
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_probe", dying_probe)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(OracleUpstream(), corpus, out, name="oracle", cache=oracle_cache, **grid)
    assert len(load_records(out)) == 4
    # A kill in the middle of an append leaves a truncated line: it is skipped, not fatal.
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "trunc')
    monkeypatch.setattr(sweep_mod, "run_probe", real)
    written = run_sweep(OracleUpstream(), corpus, out, name="oracle", cache=oracle_cache, **grid)
    assert len(written) == 2 * 2 * 4 - 4
    recs = load_records(out)
    keys = [r["key"] for r in recs]
    assert len(recs) == 16 and len(set(keys)) == 16
    lines = [l for l in (out / "results.jsonl").read_text().splitlines() if l.strip()]
    assert len(lines) == 17  # 16 records + the truncated fragment, which load_records ignores
    # Nothing left to do: a third call trains nothing.
    assert run_sweep(OracleUpstream(), corpus, out, name="oracle", cache=oracle_cache, **grid) == []
    r = next(r for r in recs if r["layer"] == "weighted")
    assert len(r["weights"]) == 3 and r["upstream"] == "oracle" and r["upstream_params"] == H * H + H
    for k in ("upstream", "upstream_params", "task", "head", "layer", "mode", "label_fraction", "seed",
              "valid_acc", "test_acc", "train_seconds"):
        assert k in r


def test_append_is_one_line_per_record(tmp_path):
    append_record(tmp_path, {"key": "a", "x": 1})
    (tmp_path / "results.jsonl").open("a").write('{"key": "b", "x"')  # truncated by a kill
    append_record(tmp_path, {"key": "c", "x": 3})
    assert [r["key"] for r in load_records(tmp_path)] == ["a", "c"]


def test_results_table_csv_and_plots(corpus, oracle_cache, tmp_path, capsys):
    out = tmp_path / "probes"
    run_sweep(OracleUpstream(), corpus, out, name="oracle", cache=oracle_cache, tasks=["phone"],
              heads=["linear"], layers="all,weighted", label_fractions=[0.1, 1.0], overrides=FAST, progress=False)
    # A one-state baseline drawn as a horizontal line.
    base = dict(load_records(out)[0])
    base.update(key="baseline", upstream="fbank", upstream_params=0, num_hidden_states=1, layer=0, weights=None,
                label_fraction=1.0, test_acc=0.5)
    append_record(out, base)
    assert main(["results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed and "weighted" in printed and "fbank" in printed
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("upstream,upstream_params,task,head,layer") and len(csv) == 1 + 9
    for png in ("accuracy_vs_layer.png", "accuracy_vs_label_fraction.png", "weighted_sum_weights.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_feature_baselines_are_one_state_upstreams():
    wav = torch.randn(2, 16000)
    for name, dim in (("fbank", 128), ("logmel", 80), ("logmel+delta", 160)):
        up, disp = resolve_upstream(name)
        assert isinstance(up, FeatureUpstream) and disp == name
        states, lengths = up.extract(wav, torch.tensor([16000, 8000]))
        assert len(states) == 1 and up.num_hidden_states == 1
        assert states[0].shape[-1] == dim == up.hidden_size and up.frame_shift == pytest.approx(0.01)
        assert int(lengths[0]) == states[0].shape[1] and int(lengths[1]) < int(lengths[0])


def test_random_upstream_is_seeded():
    a, name = resolve_upstream("random:mockingjay-tiny")
    b, _ = resolve_upstream("random:mockingjay-tiny")
    c, name_c = resolve_upstream("random:mockingjay-tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert name == "random:mockingjay-tiny" and name_c != name
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point)


def test_cli_extract_probe_results(corpus, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    assert main(["extract", "--checkpoint", "logmel", "--data", str(corpus), "--out", str(cache),
                 "--dtype", "float32"]) == 0
    idx = json.loads((cache / "index.json").read_text())
    assert idx["upstream"]["name"] == "logmel" and idx["layers"] == [0]
    out = tmp_path / "probes"
    args = ["probe", "--upstream", "logmel", "--data", str(corpus), "--task", "phone,speaker", "--head", "linear",
            "--layers", "last", "--cache", str(cache), "--out", str(out), "--steps", "20"]
    assert main(args) == 0
    recs = load_records(out)
    # log-mel's per-utterance CMVN zeroes every utterance's mean frame: its mean-pooled speaker
    # probe would classify rounding noise, so it is left out (warned), not reported at chance.
    assert [r["task"] for r in recs] == ["phone"] and recs[0]["upstream"] == "logmel"
    assert "not probed" in caplog.text and "per-utterance CMVN" in caplog.text
    task = args.index("phone,speaker")
    assert main(args[:task] + ["phone"] + args[task + 1:]) == 0
    assert "already" in capsys.readouterr().out
    assert len(load_records(out)) == 1
    # Only the speaker probe asked for: nothing to measure is an error, not an empty success.
    caplog.clear()
    assert main(args[:task] + ["speaker"] + args[task + 1:]) == 2
    assert "1 of 1 probes not run" in caplog.text and "the same for every utterance" in caplog.text
    # fbank (no per-utterance normalisation) keeps its speaker probe.
    assert main(["probe", "--upstream", "fbank", "--data", str(corpus), "--task", "speaker", "--head", "linear",
                 "--layers", "last", "--out", str(tmp_path / "fbank")]) == 0
    assert [r["task"] for r in load_records(tmp_path / "fbank")] == ["speaker"]
    # A cache made by another upstream is refused, naming it.
    rc = main(["probe", "--upstream", "fbank", "--data", str(corpus), "--cache", str(cache), "--out", str(out)])
    assert rc == 2


def test_cli_random_preset_sweep_extracts_once(corpus, tmp_path):
    out = tmp_path / "probes"
    args = ["probe", "--upstream", "random:mockingjay-tiny", "--data", str(corpus), "--layers", "all,weighted",
            "--out", str(out), "--steps", "5"]
    assert main(args) == 0
    caches = list((out / "cache").glob("*/index.json"))
    assert len(caches) == 1
    recs = load_records(out)
    nhs = recs[0]["num_hidden_states"]
    assert len(recs) == nhs + 1 and recs[0]["upstream_params"] > 0


def test_finetune_sweep_starts_each_probe_from_the_same_weights(corpus, tmp_path):
    up = OracleUpstream()
    before = {k: v.clone() for k, v in up.state_dict().items()}
    recs = run_sweep(up, corpus, tmp_path / "ft", name="oracle", finetune=True, heads=["linear", "mlp1"], layers="2",
                     overrides={"steps": 5, "batch_seconds": 8.0, "hidden": 8, "upstream_lr": 1e-2},
                     progress=False)
    assert [r["mode"] for r in recs] == ["finetune", "finetune"] and all(r["upstream_lr"] == 1e-2 for r in recs)
    # The caller's upstream is untouched: each probe fine-tunes its own copy.
    assert all(torch.equal(before[k], v) for k, v in up.state_dict().items())
    assert not (tmp_path / "ft" / "cache").exists()  # fine-tuning never extracts a cache


def test_sweep_from_a_run_directory(corpus, tmp_path):
    from aviary.models.registry import get_family, get_preset
    from aviary.storage import save_tensors

    cfg = get_preset("mockingjay-tiny")
    torch.manual_seed(0)
    up = get_family(cfg.family).build_upstream(cfg)
    run = tmp_path / "my-run"
    save_tensors(run / "model.safetensors", {f"upstream.{k}": v for k, v in up.state_dict().items()},
                 config={"model": cfg.to_dict(), "step": 0})
    recs = run_sweep(str(run), corpus, tmp_path / "p", layers="last", overrides={"steps": 5}, progress=False)
    assert recs[0]["upstream"] == "my-run" and recs[0]["layer"] == "last"
    assert recs[0]["upstream_params"] == sum(p.numel() for p in up.parameters())


def test_frame_tasks_refused_for_upstreams_without_frames(corpus, tmp_path):
    """An SSAST patch model's tokens are 16x16 patches, not time steps: phone probing refuses."""
    from aviary.models.registry import get_family, get_preset

    cfg = get_preset("ssast-patch-cpu")
    up = get_family(cfg.family).build_upstream(cfg)
    assert up.utterance_level_only
    with pytest.raises(ValueError, match="not frames"):
        run_sweep(up, corpus, tmp_path / "p", tasks=["phone"], name="patch", progress=False)


def _old_record(**kw):
    """A record as the epoch-based trainer wrote it (no test_ci, no solver)."""
    r = {"key": "fbank|phone|linear|0|frozen|1|0", "upstream": "fbank", "upstream_params": 0, "upstream_kind": "features",
         "num_hidden_states": 1, "task": "phone", "head": "linear", "hidden": None, "layer": 0, "mode": "frozen",
         "label_fraction": 1.0, "seed": 0, "valid_acc": 0.4, "test_acc": 0.41, "train_seconds": 3.0, "best_epoch": 9,
         "epochs": 12, "lr": 1e-3, "upstream_lr": None, "weights": None}
    r.update(kw)
    return r


def test_old_records_load_and_are_refitted_on_resume(corpus, oracle_cache, tmp_path, capsys):
    out = tmp_path / "p"
    append_record(out, _old_record())
    assert main(["results", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fbank" in printed and "epochs=12" in printed
    row = next(l for l in printed.splitlines() if l.startswith("phone"))
    assert " - " in row  # no interval for an old record
    assert (out / "results.csv").read_text().splitlines()[1].count(",") == 20
    # An old-format record of a probe does not count as done: the probe is fitted again.
    old_key = "oracle|phone|linear|1|frozen|1|0"
    append_record(out, _old_record(key=old_key, upstream="oracle", layer=1))
    recs = run_sweep(None, corpus, out, cache=oracle_cache, layers="1", progress=False)
    assert [r["key"] for r in recs] == [old_key] and recs[0]["solver"] == "lbfgs"
    assert next(r for r in load_records(out) if r["key"] == old_key)["test_ci"] is not None
    assert run_sweep(None, corpus, out, cache=oracle_cache, layers="1", progress=False) == []


def test_several_seeds_are_aggregated(corpus, oracle_cache, tmp_path):
    from aviary.evaluate.results import aggregate, format_table

    out = tmp_path / "s"
    run_sweep(None, corpus, out, cache=oracle_cache, tasks=["speaker"], heads=["mlp1"], layers="0", seeds=[0, 1, 2],
              overrides={"steps": 20, "hidden": 8, "lr": 1e-2}, progress=False)
    recs = load_records(out)
    assert sorted(r["seed"] for r in recs) == [0, 1, 2]
    (agg,) = aggregate(recs)
    tests = [r["test_acc"] for r in recs]
    assert agg["seeds"] == 3 and agg["test_mean"] == pytest.approx(np.mean(tests))
    assert agg["test_std"] == pytest.approx(np.std(tests, ddof=1)) and agg["test_min"] == min(tests)
    assert agg["test_ci_low"] == pytest.approx(np.mean([r["test_ci"][0] for r in recs]))
    table = format_table(recs)
    assert "over seeds" in table and "test mean" in table
    s = summarize(out)
    mean_csv = (out / "results_mean.csv").read_text().splitlines()
    assert s["mean_csv"].endswith("results_mean.csv") and len(mean_csv) == 2 and mean_csv[1].split(",")[6] == "3"


def test_cli_lr_auto_or_number(corpus, oracle_cache, tmp_path):
    out = tmp_path / "c"
    base = ["probe", "--cache", str(oracle_cache), "--data", str(corpus), "--task", "speaker", "--head", "mlp1",
            "--layers", "1", "--hidden", "8", "--steps", "10", "--out", str(out)]
    assert main(base + ["--lr", "auto", "--lr-grid", "1e-3,1e-2", "--lr-extend", "0"]) == 0
    assert main(base + ["--lr", "0.003", "--seed", "1"]) == 0
    recs = sorted(load_records(out), key=lambda r: r["seed"])
    assert recs[0]["lr_auto"] is True and len(recs[0]["lr_trials"]) == 2
    assert recs[1]["lr"] == 0.003 and recs[1]["lr_auto"] is False
    with pytest.raises(SystemExit):
        main(base + ["--lr", "fast"])
    # --lr-per sweep: the second layer reuses the first one's choice.
    assert main(base + ["--layers", "0,1", "--lr-grid", "1e-3,1e-2", "--lr-extend", "0", "--lr-per", "sweep",
                        "--seed", "2"]) == 0
    first, second = [r for r in load_records(out) if r["seed"] == 2]
    assert len(first["lr_trials"]) == 2 and second["lr_source"] == first["key"] and second["lr"] == first["lr"]
    # --l2-start strongest: the solved probe's path begins at the grid's strongest value.
    assert main(base + ["--head", "linear", "--l2-start", "strongest", "--seed", "3"]) == 0
    (solved,) = [r for r in load_records(out) if r["seed"] == 3]
    assert solved["l2_path"][0]["l2"] == 0.1 and "l2_start=strongest" in solved["key"]


def test_lr_chosen_once_per_sweep(corpus, oracle_cache, tmp_path, monkeypatch):
    """``lr_per="sweep"``: the first AdamW probe of each (task, head, label fraction, seed) runs
    the lr trials; the sweep's later probes of that group train at its choice (no trials) and
    say where it came from; solved linear probes are untouched. A resumed sweep reads the
    choice back from the records."""
    out = tmp_path / "once"
    grid = dict(tasks=["speaker"], heads=["linear", "mlp1"], layers="all,weighted", seeds=[0, 1],
                overrides={"steps": 20, "hidden": 8, "lr_grid": (1e-3, 1e-2), "lr_extend": 0, "lr_per": "sweep"},
                progress=False)
    real = sweep_mod.run_probe
    calls = {"n": 0}

    def dying_probe(*a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # 8 linear probes, mlp1 layer 0 for both seeds, then killed
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "run_probe", dying_probe)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(None, corpus, out, cache=oracle_cache, **grid)
    assert len(load_records(out)) == 10
    monkeypatch.setattr(sweep_mod, "run_probe", real)
    run_sweep(None, corpus, out, cache=oracle_cache, **grid)
    recs = load_records(out)
    assert len(recs) == 2 * 4 * 2
    for r in recs:
        if r["head"] == "linear":
            assert r["solver"] == "lbfgs" and r["lr_source"] is None
    for seed in (0, 1):
        mlp = [r for r in recs if r["head"] == "mlp1" and r["seed"] == seed]
        first, rest = mlp[0], mlp[1:]
        assert first["layer"] == 0 and len(first["lr_trials"]) == 2 and first["lr_source"] is None
        assert len(rest) == 3
        for r in rest:
            assert r["lr_trials"] is None and r["lr_auto"] is True
            assert r["lr"] == first["lr"] and r["lr_source"] == first["key"]
            assert "lr_per=sweep" in r["key"]
    # The same probe run by itself (lr_per "probe", the default) runs its own trials.
    alone = run_sweep(None, corpus, tmp_path / "alone", cache=oracle_cache, tasks=["speaker"], heads=["mlp1"],
                      layers="2", overrides={"steps": 20, "hidden": 8, "lr_grid": (1e-3, 1e-2), "lr_extend": 0},
                      progress=False)
    assert len(alone[0]["lr_trials"]) == 2 and alone[0]["lr_source"] is None


def test_lr_per_sweep_with_a_fixed_lr_changes_nothing(corpus, oracle_cache, tmp_path):
    recs = run_sweep(None, corpus, tmp_path / "f", cache=oracle_cache, tasks=["speaker"], heads=["mlp1"],
                     layers="0,1", overrides={"steps": 10, "hidden": 8, "lr": 3e-3, "lr_per": "sweep"},
                     progress=False)
    assert [(r["lr"], r["lr_auto"], r["lr_source"]) for r in recs] == [(3e-3, False, None)] * 2
