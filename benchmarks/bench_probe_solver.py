"""Benchmark: solved linear probes against the epoch-based trainer they replace (issue 15).

Three measurements, each written into ``benchmarks/results/probe_solver.json``:

1. **small corpus** (6 speakers x 10 utterances, seed 7): the fbank linear speaker probe,
   solved (target >= 80 % test) and with the epoch-based trainer's defaults.
2. **timing**: the demo's probe set (phone linear + mlp1 at its 30 % label fraction over every
   layer and the weighted sum, speaker linear likewise; baselines every layer) on cached
   features, with the code of ``--baseline-commit`` ("today's", its demo settings) and with
   this tree (``probe_overrides(DemoConfig())``), alternating old / new per upstream in one
   run on one machine. The demo probes three upstreams of the pretrained shape (Mockingjay,
   AALBERT, random init: identical feature sizes) and two baselines (logmel, fbank); the
   pretrained model's times stand for all three (``demo_estimate_seconds``).
3. **grid vs solved**: the epoch-based trainer over lr {1e-3, 3e-3, 1e-2} x max_epochs
   {6, 12, 24} (9 settings, today's patience) for fbank and the pretrained model's best solved
   layer (phone, 30 % labels), against the solved probe's test accuracy (target: within 0.5
   points of the grid's best-on-valid setting, or better).

Every process uses one torch thread (``--threads N``: the probing processes use N, as the demo
uses the machine's; extraction stays at one).

    .venv/bin/python -m benchmarks.bench_probe_solver --upstream runs/aalbert --corpus corpus
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

BASELINE_COMMIT = "30532c1ecdda72e1c99a6c260fb2a711e16d1972"  # before solved probes (issue 15)
# aviary/analysis/demo.py run_probes() at BASELINE_COMMIT: the demo's hand-tuned recipe.
OLD_DEMO_OVERRIDES = {"max_epochs": 12, "patience": 3, "lr": 1e-2, "batch_frames": 4096, "batch_utterances": 64,
                      "autocast": "bf16"}
PHONE_FRACTION = 0.3  # DemoConfig.probe_label_fraction (both versions)
GRID_LRS = (1e-3, 3e-3, 1e-2)
GRID_EPOCHS = (6, 12, 24)
REPO = Path(__file__).resolve().parent.parent
THREADS = 1  # torch threads of the probing children (--threads)


def _driver(args: argparse.Namespace) -> int:
    """Child process: one sweep with whichever aviary is on PYTHONPATH; prints JSON."""
    import torch

    torch.set_num_threads(int(os.environ.get("AVIARY_BENCH_THREADS", "1")))
    from aviary.evaluate.results import load_records
    from aviary.evaluate.sweep import run_sweep

    spec = json.loads(args.driver)
    try:  # the trees after 12606e9 refuse uninformative pooled features (log-mel's speaker probe)
        from aviary.evaluate.probe import UninformativeFeatures
    except ImportError:
        UninformativeFeatures = ()
    if Path(spec["out"], "results.jsonl").exists():
        raise SystemExit(f"{spec['out']} holds results already: its probes would be skipped, not timed")
    t0 = time.perf_counter()
    refused = []
    for task, heads, frac in spec["sweeps"]:
        try:
            run_sweep(None, spec["corpus"], spec["out"], cache=spec["cache"], tasks=[task], heads=heads,
                      layers=spec["layers"], label_fractions=[frac], overrides=spec["overrides"], progress=False)
        except UninformativeFeatures as e:  # the demo leaves these out too ("-")
            refused.append(f"{task} {heads}: {e}")
    took = time.perf_counter() - t0
    recs = load_records(spec["out"])
    print(json.dumps({"seconds": took, "records": [{k: r.get(k) for k in (
        "task", "head", "layer", "valid_acc", "test_acc", "test_ci", "train_seconds", "solver", "l2", "iterations_total",
        "converged", "lr", "steps_run", "epochs", "best_epoch")} for r in recs], "not_probed": refused}))
    return 0


def _child(tree: Path, spec: dict) -> dict:
    n = str(THREADS)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "AVIARY_BENCH_THREADS": n}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--driver", json.dumps(spec)],
                          env=env, cwd=str(tree), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"driver failed ({tree}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _extract(tree: Path, upstream: str, corpus: Path, out: Path, autocast: str) -> float:
    if (out / "index.json").is_file():
        return 0.0
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aviary", "-q", "extract", "--checkpoint", upstream, "--data", str(corpus),
                    "--out", str(out), "--autocast", autocast, "--threads", "1"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _v1_view(cache: Path) -> Path:
    """The cache as the baseline commit can read it: hard links to its files and an index saying
    version 1 (version 2 added per-file checksums in ``shard.json``; the layer files are the same)."""
    view = cache.with_name(cache.name + "-v1")
    if (view / "index.json").is_file():
        return view
    for src in cache.rglob("*"):
        dst = view / src.relative_to(cache)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.name != "index.json":
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    index = json.loads((cache / "index.json").read_text())
    (view / "index.json").write_text(json.dumps({**index, "version": 1}))
    return view


def _best(recs: list[dict], **match) -> dict:
    sel = [r for r in recs if all(r[k] == v for k, v in match.items()) and isinstance(r["layer"], int)]
    return max(sel, key=lambda r: (r["valid_acc"], -r["layer"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--driver", help=argparse.SUPPRESS)
    p.add_argument("--upstream", help="pretrained run directory (e.g. an aalbert-cpu run of 600 steps)")
    p.add_argument("--corpus", help="the default synthetic corpus (40 x 50, seed 0)")
    p.add_argument("--work", help="working directory (caches, old tree, small corpus); default: temporary")
    p.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    p.add_argument("--parts", default="small,timing,grid")
    p.add_argument("--name", default="probe_solver")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the probing processes (the demo uses the machine's: 2 here)")
    args = p.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if args.driver:
        return _driver(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from aviary.analysis.demo import DemoConfig, probe_overrides

    parts = set(args.parts.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="aviary-bench-solver-"))
    work.mkdir(parents=True, exist_ok=True)
    old_tree = work / "old-tree"
    if not (old_tree / "aviary").is_dir():
        old_tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", args.baseline_commit], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    new_tree = REPO
    new_ov = probe_overrides(DemoConfig())[0]  # (ProbeConfig overrides, extraction keywords)
    res: dict = {"baseline_commit": args.baseline_commit, "old_overrides": OLD_DEMO_OVERRIDES,
                 "new_overrides": new_ov, "threads": THREADS}
    res_path = None

    def save() -> None:
        nonlocal res_path
        res["load_average_1m"] = round(os.getloadavg()[0], 2)
        res_path = write_result(args.name, res)

    if "small" in parts:
        small = work / "small-corpus"
        if not (small / "manifest.jsonl").is_file():
            subprocess.run([sys.executable, "-m", "aviary", "-q", "synth", "--out", str(small), "--speakers", "6",
                            "--utterances-per-speaker", "10", "--seed", "7"], check=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL)
        _extract(new_tree, "fbank", small, work / "small-fbank", "none")
        out = {}
        for which, tree, ov in (("old", old_tree, {}), ("new", new_tree, {})):
            spec = {"corpus": str(small), "cache": str(work / "small-fbank"), "out": str(work / f"small-{which}"),
                    "layers": "last", "overrides": ov, "sweeps": [["speaker", ["linear"], 1.0], ["phone", ["linear"], 1.0]]}
            out[which] = _child(tree, spec)
        res["small_corpus"] = {"corpus": "aviary synth --speakers 6 --utterances-per-speaker 10 --seed 7",
                               "upstream": "fbank", **out}
        save()

    if "timing" in parts or "grid" in parts:
        if not args.upstream or not args.corpus:
            raise SystemExit("--upstream and --corpus are needed for the timing and grid parts")
        corpus = Path(args.corpus)
        caches = {"pretrained": work / "cache-pretrained", "fbank": work / "cache-fbank", "logmel": work / "cache-logmel"}
        res["extract_seconds"] = {
            "pretrained": _extract(new_tree, args.upstream, corpus, caches["pretrained"], "bf16"),
            "fbank": _extract(new_tree, "fbank", corpus, caches["fbank"], "none"),
            "logmel": _extract(new_tree, "logmel", corpus, caches["logmel"], "none")}
    if "timing" in parts:
        timing: dict = {}
        for up, layers in (("pretrained", "all,weighted"), ("fbank", "all"), ("logmel", "all")):
            for which, tree, ov in (("old", old_tree, OLD_DEMO_OVERRIDES), ("new", new_tree, new_ov)):
                cache = _v1_view(caches[up]) if which == "old" else caches[up]
                spec = {"corpus": str(corpus), "cache": str(cache), "out": str(work / f"timing-{which}-{up}"),
                        "layers": layers, "overrides": ov,
                        "sweeps": [["phone", ["linear", "mlp1"], PHONE_FRACTION], ["speaker", ["linear"], 1.0]]}
                r = _child(tree, spec)
                timing.setdefault(up, {})[which] = r
                logging.info("timing %s %s: %.0f s", up, which, r["seconds"])
                res["timing"] = timing
                save()
        est = {w: 3 * timing["pretrained"][w]["seconds"] + timing["fbank"][w]["seconds"] + timing["logmel"][w]["seconds"]
               for w in ("old", "new")}
        res["demo_estimate_seconds"] = {**{w: round(v, 1) for w, v in est.items()},
                                        "new_over_old": round(est["new"] / est["old"], 3),
                                        "note": "3 x the pretrained model's probe set (mockingjay, aalbert, random-init "
                                                "share its feature sizes) + fbank + logmel; probe fitting only "
                                                "(extraction is the same code in both)"}
        save()
    if "grid" in parts:
        new_recs = {}
        for up in ("pretrained", "fbank"):
            if "timing" in res and up in res["timing"]:
                new_recs[up] = res["timing"][up]["new"]["records"]
            else:
                spec = {"corpus": str(corpus), "cache": str(caches[up]), "out": str(work / f"timing-new-{up}"),
                        "layers": "all", "overrides": new_ov, "sweeps": [["phone", ["linear"], PHONE_FRACTION]]}
                new_recs[up] = _child(new_tree, spec)["records"]
        grid: dict = {}
        for up in ("pretrained", "fbank"):
            solved = _best(new_recs[up], task="phone", head="linear")
            layer = solved["layer"]
            runs = []
            for lr in GRID_LRS:
                for ep in GRID_EPOCHS:
                    ov = {**OLD_DEMO_OVERRIDES, "lr": lr, "max_epochs": ep, "patience": 4}
                    spec = {"corpus": str(corpus), "cache": str(_v1_view(caches[up])),
                            "out": str(work / f"grid-{up}-{lr:g}-{ep}"), "layers": str(layer), "overrides": ov,
                            "sweeps": [["phone", ["linear"], PHONE_FRACTION]]}
                    r = _child(old_tree, spec)
                    rec = r["records"][0]
                    runs.append({"lr": lr, "max_epochs": ep, "valid_acc": rec["valid_acc"], "test_acc": rec["test_acc"],
                                 "epochs": rec["epochs"], "best_epoch": rec["best_epoch"], "seconds": round(r["seconds"], 1)})
                    logging.info("grid %s layer %s lr %g ep %d: test %.4f", up, layer, lr, ep, rec["test_acc"])
            best_valid = max(runs, key=lambda g: g["valid_acc"])
            grid[up] = {"layer": layer, "solved": solved, "grid": runs,
                        "grid_best_on_valid": best_valid, "grid_best_test": max(g["test_acc"] for g in runs),
                        "solved_minus_grid_points": round(100 * (solved["test_acc"] - best_valid["test_acc"]), 2),
                        "solved_minus_best_grid_test_points": round(
                            100 * (solved["test_acc"] - max(g["test_acc"] for g in runs)), 2)}
            res["grid_vs_solved"] = grid
            save()
    save()
    print(f"wrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
