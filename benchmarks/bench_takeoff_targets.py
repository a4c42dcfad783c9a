"""Benchmark: do BEST-RQ and HuBERT-style targets leave their unigram level on a CPU budget?

The masked-prediction twin of ``bench_takeoff`` (which covers the reconstruction recipes):
``bestrq-cpu`` and ``hubert-cpu`` pretrain with exactly the demo's settings
(``analysis.demo.train_config``: 600 steps, peak lr 5e-4, 16 s batches of 4 s crops) on the
demo's corpus; ``hubert-cpu`` first gets MFCC k-means targets made by
``aviary.train.targets.with_mfcc_targets`` with the preset's settings (K = 100, R = 3,
per-utterance CMVN'd MFCC; ``--set objective.mfcc_normalize=none`` for the paper's raw MFCC). A model that has not learned predicts how often
each code / cluster occurs: its cross-entropy on the masked frames is the entropy of their
histogram. The loop logs that per validation batch (``unigram_ce``, biased low: ~200 masked
frames per batch); :func:`aviary.train.targets.unigram_level` measures it over the whole validation split (the
cross-entropy of its codes under the training split's frequencies). Reported per run: the
validation curve of ``ce`` and ``acc``, the final ``ce`` over both levels (took off at <= 0.85 of
the corpus level, the MAM recipes' threshold) and the linear phone probe of the best layer (the
demo's probe).

    .venv/bin/python -m benchmarks.bench_takeoff_targets --corpus CORPUS --seeds 0

Runs are kept in ``--work``; a finished run is read back. Results:
``benchmarks/results/takeoff-targets.json`` (earlier presets: ``takeoff-targets-span3.json``,
``takeoff-targets-span1.json``).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from aviary.train.targets import unigram_level
from benchmarks.bench_takeoff import finish_record, pretrain_run, work_and_corpus
from benchmarks.common import write_result

log = logging.getLogger("bench_takeoff_targets")

RECIPES = ("bestrq-cpu", "hubert-cpu")
TAKEOFF = 0.85  # final ce / unigram_ce


def run_one(recipe: str, seed: int, precision: str, corpus: Path, work: Path, steps: int | None,
            probe: bool, overrides: list[str] | None = None, tag: str = "") -> dict[str, Any]:
    from aviary.analysis.demo import DemoConfig, train_config
    from aviary.models.registry import count_parameters, get_family, get_preset
    from aviary.train.targets import FrameTargets, with_mfcc_targets

    from aviary.config import apply_overrides

    name = f"{recipe}{tag}-s{seed}-{precision}"
    run_dir = work / "runs" / name
    done = work / "runs" / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    # HuBERT: MFCC k-means targets (the preset's K and normalisation) at the encoder's frame
    # rate, made once per setting.
    mcfg = apply_overrides(get_preset(recipe), overrides or [])
    obj = mcfg.objective
    if hasattr(obj, "targets"):
        mcfg = with_mfcc_targets(mcfg, corpus,
                                 work / f"targets-mfcc-k{obj.num_clusters}-{obj.mfcc_normalize}-r{mcfg.encoder.downsample}")
    tdir = Path(mcfg.objective.targets) if getattr(mcfg.objective, "targets", "") else None
    demo = DemoConfig(preset=recipe, seed=seed, precision=precision, **({"steps": steps} if steps else {}))
    tcfg = train_config(demo)
    result, seconds, valid = pretrain_run(mcfg, tcfg, corpus, run_dir)
    curve = [{"step": r["step"], "ce": r["ce"], "acc": r["acc"], "unigram_ce": r["unigram_ce"],
              "ratio": r["ce"] / r["unigram_ce"]} for r in valid]
    final = curve[-1]
    level = unigram_level(run_dir, corpus)
    rec: dict[str, Any] = {
        "recipe": recipe, "overrides": overrides or [], "seed": seed, "precision": precision, "steps": result.step,
        "pretrain_seconds": round(seconds, 1), "curve": curve, "final_ce": final["ce"],
        "final_ratio": final["ratio"], "unigram": level,
        "final_ratio_corpus": final["ce"] / level["unigram_ce_valid_under_train"],
        "took_off": final["ce"] / level["unigram_ce_valid_under_train"] <= TAKEOFF,
        "params": count_parameters(get_family(mcfg.family).build_upstream(mcfg)),
        "targets": str(tdir) if tdir else None,
    }
    if tdir:
        kcfg = FrameTargets(tdir).info["config"]
        rec["targets_kmeans"] = {k: kcfg.get(k, "none" if k == "normalize" else None)
                                 for k in ("features", "clusters", "normalize", "fit_frames")}
    return finish_record(rec, probe, run_dir, corpus, work, precision, done)


def main(argv: list[str] | None = None) -> int:
    from aviary.precision import resolve_precision

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--steps", type=int, default=None, help="override the demo's budget (smoke runs)")
    p.add_argument("--corpus", default=None, help="corpus directory (default: the demo's, made in --work)")
    p.add_argument("--work", default="takeoff_work")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-name", default="takeoff-targets")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config overrides for a variant (e.g. objective.span=1); name its runs with --tag")
    p.add_argument("--tag", default="", help="suffix of the variant's run names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    work, corpus = work_and_corpus(args.work, args.corpus)
    runs = []
    for recipe in args.recipes:
        for seed in args.seeds:
            rec = run_one(recipe, seed, precision, corpus, work, args.steps, not args.no_probe, args.set, args.tag)
            runs.append(rec)
            pr = rec.get("probe", {})
            log.info("%s seed %d %s: final ce %.3f = %.3f x unigram (%s), best layer %s %.1f %%", recipe, seed,
                     precision, rec["final_ce"], rec["final_ratio_corpus"], "took off" if rec["took_off"] else "NOT LEARNED",
                     pr.get("best_layer"), 100 * pr.get("test_acc", float("nan")))
            write_result(args.out_name, {"takeoff_ratio": TAKEOFF, "runs": runs, "corpus": str(corpus),
                                         "threads": torch.get_num_threads()})
    return 0 if all(r["took_off"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
