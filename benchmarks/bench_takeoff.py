"""Benchmark: does every CPU recipe leave its plateau, for every seed and precision?

A masked model that has not learned sits on a plateau: the masked-reconstruction models
(Mockingjay, Audio ALBERT, TERA) at the L1 of the utterance-mean predictor, SSAST at chance
retrieval. Whether a run leaves it within a CPU budget used to depend on the seed, a tiny
change of the corpus and the CPU's precision. This benchmark runs each CPU recipe for its
budget with several seeds, in fp32 and, where the CPU has native bf16 (AMX / AVX512-BF16),
under bf16 autocast, and reports per run:

- the validation curve (the same validation batches and masks at every point of a run);
- the final validation loss against the plateau measured on the same batches: for the MAM
  recipes ``l1 / l1_utt_mean`` (the model's L1 over the utterance-mean predictor's), for
  SSAST ``acc / chance_acc`` (masked-patch retrieval over guessing);
- the linear phone probe of the best layer (chosen on valid, test accuracy; the demo's probe
  settings, 30 % of the training labels).

Targets (issue 14): every run leaves the plateau (MAM: final L1 <= 0.85 x the mean
predictor's; SSAST: retrieval >= 3 x chance), the final validation loss varies by <= 10 %
across seeds, the best layer's probe accuracy by <= 2 points.

    .venv/bin/python -m benchmarks.bench_takeoff                       # all recipes, seeds 0 1 2
    .venv/bin/python -m benchmarks.bench_takeoff --recipes aalbert-cpu --seeds 0 1 2 3 4

Runs are kept in ``--work`` (default ``takeoff_work/``); a finished run is read back, not
repeated, so an interrupted benchmark continues where it stopped. Results:
``benchmarks/results/takeoff.json``.

``--demo DIR`` reads the Mockingjay / Audio ALBERT runs of a finished ``aviary demo --seeds N
--out DIR`` instead of training them again: the demo trains exactly these recipes
(:func:`train_settings`), so its runs for seeds ``seed .. seed + N - 1`` at its precision are
this benchmark's runs, and its probe records hold the same linear phone probes.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_result

log = logging.getLogger("bench_takeoff")

MAM_RECIPES = ("mockingjay-cpu", "aalbert-cpu", "tera-cpu")
SSAST_RECIPES = ("ssast-frame-cpu", "ssast-patch-cpu")
RECIPES = MAM_RECIPES + SSAST_RECIPES
#: MAM: final L1 at most this fraction of the utterance-mean predictor's.
MAM_TAKEOFF = 0.85
#: SSAST: retrieval accuracy at least this multiple of chance.
SSAST_TAKEOFF = 3.0
LOSS_SPREAD = 0.10  # (max - min) / mean of the final valid loss across seeds
PROBE_SPREAD = 2.0  # points, best layer's linear phone probe across seeds


def train_settings(recipe: str, seed: int, precision: str, steps: int | None):
    """(model config, TrainConfig) of a recipe: the demo's budget for the MAM recipes, the
    shipped ``configs/<recipe>.yaml`` for SSAST."""
    from aviary.analysis.demo import DemoConfig, train_config
    from aviary.models.registry import get_preset
    from aviary.train.recipe import resolve_configs

    if recipe in MAM_RECIPES:
        demo = DemoConfig(preset=recipe, seed=seed, precision=precision, **({"steps": steps} if steps else {}))
        # Exactly the demo's settings (a demo run and a benchmark run of one seed are the same run).
        return get_preset(recipe), train_config(demo, model="aalbert" if recipe == "aalbert-cpu" else None)
    yaml = Path(__file__).resolve().parent.parent / "configs" / f"{recipe}.yaml"
    over = [f"train.seed={seed}", f"train.precision={precision}", "train.tensorboard=false"]
    mcfg, tcfg = resolve_configs(None, str(yaml), over, steps)
    return mcfg, tcfg.replace(val_every=max(1, tcfg.steps // 4))


def plateau_ratio(recipe: str, rec: dict[str, float]) -> float | None:
    """How far a validation record is from the plateau (see the module docstring)."""
    if recipe in MAM_RECIPES:
        return rec["l1"] / rec["l1_utt_mean"] if rec.get("l1_utt_mean") else None
    return rec["acc"] / rec["chance_acc"] if rec.get("chance_acc") else None


def took_off(recipe: str, ratio: float | None) -> bool:
    if ratio is None:
        return False
    return ratio <= MAM_TAKEOFF if recipe in MAM_RECIPES else ratio >= SSAST_TAKEOFF


def best_layer_probe(run_dir: Path, corpus: Path, out: Path, precision: str) -> dict[str, Any]:
    """Linear phone probes of every layer (demo settings); the best on valid, its test accuracy."""
    import aviary
    from aviary.analysis.demo import DemoConfig, probe_overrides
    from aviary.evaluate.results import load_records
    from aviary.evaluate.sweep import run_sweep

    demo = DemoConfig(precision=precision)
    over, extract = probe_overrides(demo)
    run_sweep(aviary.load(str(run_dir)), corpus, out=out, tasks=["phone"], heads=["linear"],
              layers="all", label_fractions=[demo.probe_label_fraction], overrides=over,
              extract=extract, name=run_dir.name, progress=False)
    recs = [r for r in load_records(out) if r.get("upstream") == run_dir.name and isinstance(r.get("layer"), int)]
    best = max(recs, key=lambda r: (r["valid_acc"], -r["layer"]))
    return {"best_layer": best["layer"], "valid_acc": best["valid_acc"], "test_acc": best["test_acc"],
            "test_ci": best.get("test_ci"), "test_acc_by_layer": {str(r["layer"]): r["test_acc"] for r in sorted(recs, key=lambda r: r["layer"])}}


def from_demo(demo: Path, recipe: str, seed: int, precision: str) -> dict[str, Any] | None:
    """The record of (recipe, seed, precision) from a finished demo directory, or None."""
    from aviary.analysis.demo import AALBERT, MOCKINGJAY, seed_runs
    from aviary.analysis.report import best_layer
    from aviary.evaluate.results import load_records

    summary_path = demo / "summary.json"
    if recipe not in ("mockingjay-cpu", "aalbert-cpu") or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    from aviary.analysis.demo import DemoConfig
    cfg = DemoConfig.from_dict(summary["demo"]["config"])
    base = MOCKINGJAY if recipe == "mockingjay-cpu" else AALBERT
    names = {sd: base + sf for sd, sf in seed_runs(cfg)}
    if cfg.preset != "aalbert-cpu" or seed not in names:
        return None
    model = summary["models"].get(names[seed], {})
    if model.get("precision") != precision:
        return None
    run_dir = demo / "runs" / names[seed]
    valid = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"split": "valid"' in line]
    curve = [{"step": r["step"], "loss": r["loss"], "plateau_ratio": plateau_ratio(recipe, r),
              "l1_utt_mean": r.get("l1_utt_mean")} for r in valid]
    recs = [r for r in load_records(demo / "probes") if "@" not in r["upstream"]]  # not the learning curve's
    best = best_layer(recs, names[seed], "phone", "linear")
    layers = sorted((r for r in recs if r["upstream"] == names[seed] and r["task"] == "phone"
                     and r["head"] == "linear" and isinstance(r["layer"], int)), key=lambda r: r["layer"])
    rec = {"recipe": recipe, "seed": seed, "precision": precision, "steps": model["pretrain_steps"],
           "pretrain_seconds": model["pretrain_seconds"], "curve": curve,
           "final_valid_loss": curve[-1]["loss"], "final_plateau_ratio": curve[-1]["plateau_ratio"],
           "took_off": took_off(recipe, curve[-1]["plateau_ratio"]), "params": model["params"],
           "from_demo": str(demo)}
    if best is not None:
        rec["probe"] = {"best_layer": best["layer"], "valid_acc": best["valid_acc"], "test_acc": best["test_acc"],
                        "test_ci": best.get("test_ci"),
                        "test_acc_by_layer": {str(r["layer"]): r["test_acc"] for r in layers}}
    return rec


def pretrain_run(mcfg: Any, tcfg: Any, corpus: Path, run_dir: Path) -> tuple[Any, float, list[dict[str, Any]]]:
    """Pretrain (resuming) into ``run_dir``; (result, seconds, the validation records)."""
    from aviary.train.loop import pretrain

    t0 = time.perf_counter()
    result = pretrain(mcfg, tcfg, corpus, run_dir, resume=True)
    seconds = time.perf_counter() - t0
    if result.interrupted:
        raise KeyboardInterrupt(run_dir.name)
    valid = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"split": "valid"' in line]
    return result, seconds, valid


def finish_record(rec: dict[str, Any], probe: bool, run_dir: Path, corpus: Path, work: Path, precision: str,
                  done: Path) -> dict[str, Any]:
    """Add the best layer's linear phone probe (when ``probe``), write ``done``, return ``rec``."""
    if probe:
        t1 = time.perf_counter()
        rec["probe"] = best_layer_probe(run_dir, corpus, work / "probes", precision)
        rec["probe_seconds"] = round(time.perf_counter() - t1, 1)
    done.write_text(json.dumps(rec, indent=1))
    return rec


def run_one(recipe: str, seed: int, precision: str, corpus: Path, work: Path, steps: int | None,
            probe: bool) -> dict[str, Any]:
    """Pretrain one (recipe, seed, precision) and measure it; a finished run is read back."""
    from aviary.models.registry import get_family

    name = f"{recipe}-s{seed}-{precision}"
    run_dir = work / "runs" / name
    done = work / "runs" / f"{name}.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if probe and "probe" not in rec:  # pretrained earlier with --no-probe
            t1 = time.perf_counter()
            rec["probe"] = best_layer_probe(run_dir, corpus, work / "probes", precision)
            rec["probe_seconds"] = round(time.perf_counter() - t1, 1)
            done.write_text(json.dumps(rec, indent=1))
        return rec
    mcfg, tcfg = train_settings(recipe, seed, precision, steps)
    result, seconds, valid = pretrain_run(mcfg, tcfg, corpus, run_dir)
    curve = [{"step": r["step"], "loss": r["loss"], "plateau_ratio": plateau_ratio(recipe, r),
              **({"l1_utt_mean": r["l1_utt_mean"]} if "l1_utt_mean" in r else {}),
              **({"acc": r["acc"], "chance_acc": r["chance_acc"]} if "chance_acc" in r else {})}
             for r in valid]
    final = curve[-1]
    rec: dict[str, Any] = {
        "recipe": recipe, "seed": seed, "precision": precision, "steps": result.step,
        "pretrain_seconds": round(seconds, 1), "curve": curve, "final_valid_loss": final["loss"],
        "final_plateau_ratio": final["plateau_ratio"], "took_off": took_off(recipe, final["plateau_ratio"]),
        "params": sum(p.numel() for p in get_family(mcfg.family).build_upstream(mcfg).parameters()),
    }
    return finish_record(rec, probe, run_dir, corpus, work, precision, done)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (recipe, precision): take-off count, loss and probe spreads, targets met."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(f"{r['recipe']}/{r['precision']}", []).append(r)
    out = {}
    for key, rs in groups.items():
        losses = [r["final_valid_loss"] for r in rs]
        ratios = [r["final_plateau_ratio"] for r in rs]
        probes = [100 * r["probe"]["test_acc"] for r in rs if "probe" in r]
        loss_spread = (max(losses) - min(losses)) / statistics.mean(losses) if losses else None
        s = {"seeds": [r["seed"] for r in rs], "took_off": sum(r["took_off"] for r in rs), "runs": len(rs),
             "final_valid_loss": {"mean": statistics.mean(losses), "min": min(losses), "max": max(losses),
                                  "rel_spread": loss_spread},
             "plateau_ratio": {"mean": statistics.mean(ratios), "min": min(ratios), "max": max(ratios)}}
        targets = {"all_took_off": s["took_off"] == len(rs), "loss_spread_ok": loss_spread <= LOSS_SPREAD}
        if probes:
            s["probe_best_layer_test_pct"] = {"mean": statistics.mean(probes), "min": min(probes),
                                              "max": max(probes), "spread": max(probes) - min(probes)}
            targets["probe_spread_ok"] = max(probes) - min(probes) <= PROBE_SPREAD
        s["targets"] = targets
        s["targets_met"] = all(targets.values())
        out[key] = s
    return out


def work_and_corpus(work_dir: str, corpus_dir: str | None) -> tuple[Path, Path]:
    """The work directory (made) and the corpus: ``corpus_dir``, or the demo's default made in it."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if corpus_dir:
        return work, Path(corpus_dir)
    from aviary.analysis.demo import DemoConfig, ensure_corpus
    return work, ensure_corpus(DemoConfig(), work / "corpus")


def main(argv: list[str] | None = None) -> int:
    try:
        from aviary.precision import cpu_supports_bf16
    except ImportError:  # before the precision module
        from aviary.train.loop import cpu_supports_bf16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16"),
                   help="default: fp32, plus bf16 where the CPU has it natively")
    p.add_argument("--steps", type=int, default=None, help="override every recipe's budget (smoke runs)")
    p.add_argument("--corpus", default=None, help="corpus directory (default: the demo's, made in --work)")
    p.add_argument("--work", default="takeoff_work")
    p.add_argument("--no-probe", action="store_true", help="skip the phone probes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-name", default="takeoff")
    p.add_argument("--demo", default=None, help="a finished `aviary demo --seeds N` directory whose "
                   "Mockingjay / AALBERT runs stand for those recipes at its precision")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"])
    work, corpus = work_and_corpus(args.work, args.corpus)
    runs = []
    for recipe in args.recipes:
        for precision in precisions:
            for seed in args.seeds:
                rec = (from_demo(Path(args.demo), recipe, seed, precision) if args.demo else None) or \
                    run_one(recipe, seed, precision, corpus, work, args.steps, not args.no_probe)
                runs.append(rec)
                pr = rec.get("probe", {})
                log.info("%s seed %d %s: final valid %.4f, plateau ratio %.3f (%s), best layer %s %.1f %%",
                         recipe, seed, precision, rec["final_valid_loss"], rec["final_plateau_ratio"] or float("nan"),
                         "took off" if rec["took_off"] else "ON THE PLATEAU", pr.get("best_layer"),
                         100 * pr.get("test_acc", float("nan")))
                write_result(args.out_name, {"targets": {"mam_takeoff_ratio": MAM_TAKEOFF,
                                                         "ssast_takeoff_multiple": SSAST_TAKEOFF,
                                                         "loss_rel_spread": LOSS_SPREAD,
                                                         "probe_spread_points": PROBE_SPREAD},
                                             "summary": summarise(runs), "runs": runs,
                                             "corpus": str(corpus), "threads": torch.get_num_threads()})
    summary = summarise(runs)
    for key, s in summary.items():
        print(f"{key}: {s['took_off']}/{s['runs']} took off, loss spread {s['final_valid_loss']['rel_spread']:.3f}"
              + (f", probe {s['probe_best_layer_test_pct']['mean']:.1f} % (spread {s['probe_best_layer_test_pct']['spread']:.1f})"
                 if "probe_best_layer_test_pct" in s else "") + f" -> {'met' if s['targets_met'] else 'NOT MET'}")
    return 0 if all(s["targets_met"] for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
