"""Benchmark: probe every layer of a 3-layer base-size model with all three heads.

Times, separately, (1) one extraction of every hidden state of ``mockingjay-base``
(768/3/12/3072, random init: the speed does not depend on the weights) over a synthetic
corpus into the feature cache and (2) the frozen phoneme probes on that cache: layers 0..3 x
heads linear / mlp1 / mlp2 = 12 probes with the default :class:`ProbeConfig` (early stopping
on valid). The default corpus of ``aviary synth`` (40 speakers x 50 utterances) is large
for a shared 2-core CPU, so by default a scaled-down corpus is made with the same generator
and the times are extrapolated linearly in audio duration (extraction and every probe epoch
are linear in the number of frames; the number of epochs is taken as measured).

    .venv/bin/python -m benchmarks.bench_probe            # writes benchmarks/results/probe.json
    .venv/bin/python -m benchmarks.bench_probe --speakers 40 --utterances 50   # the full default corpus
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result

DEFAULT_SPEAKERS, DEFAULT_UTTERANCES = 40, 50  # `aviary synth` defaults


def extrapolate(results: dict, max_epochs: int, patience: int, batch_frames: int) -> dict:
    """Estimate the time of the same benchmark on the default corpus from a scaled-down run.

    Extraction and one probe epoch cost time linear in the number of frames: both scale by
    ``scale`` = default audio / measured audio. The number of epochs does not: a bigger
    corpus gives proportionally more optimizer steps per epoch, and a probe converges after
    about as many *steps* as measured. So each probe is assumed to need
    ``ceil(steps_to_best / steps_per_epoch_full) + patience`` epochs (at most ``max_epochs``),
    where ``steps_to_best`` is the measured number of steps up to its best valid epoch.
    The linear (pessimistic) estimate, with the measured epoch counts, is given beside it.
    """
    import math

    scale = results["extrapolated_to_default_corpus"]["scale"]
    train_frames = results["corpus"]["train_frames"]
    steps_small = math.ceil(train_frames / batch_frames)
    steps_full = math.ceil(train_frames * scale / batch_frames)
    probe_full = probe_linear = 0.0
    for pr in results["probes"]:
        if not pr.get("epochs") or pr.get("best_epoch") is None:
            # Solved (L-BFGS) or step-budgeted probes: no epochs; cost linear in the frames
            # for the solver (every iteration is a full pass), constant for a step budget.
            per = pr["train_seconds"] * (scale if pr.get("solver") == "lbfgs" else 1.0)
            pr["estimated_epochs_default_corpus"] = None
            probe_full += per
            probe_linear += pr["train_seconds"] * scale
            continue
        best = pr.get("best_epoch")
        if best is None:  # older records: stopped early -> best was `patience` epochs before the end
            best = pr["epochs"] - 1 - (patience if pr["epochs"] < max_epochs else 0)
        steps_to_best = (best + 1) * steps_small
        epochs_full = min(max_epochs, math.ceil(steps_to_best / steps_full) + patience)
        per_epoch = pr["seconds_per_epoch"] * scale
        pr["estimated_epochs_default_corpus"] = epochs_full
        probe_full += per_epoch * epochs_full
        probe_linear += per_epoch * pr["epochs"]
    ext = results["extrapolated_to_default_corpus"]
    ext.update({
        "probe_seconds": round(probe_full, 0),
        "probe_seconds_same_epochs": round(probe_linear, 0),
        "total_minutes": round((ext["extract_seconds"] + probe_full) / 60, 1),
        "total_minutes_same_epochs": round((ext["extract_seconds"] + probe_linear) / 60, 1),
        "steps_per_epoch": {"measured": steps_small, "default_corpus": steps_full},
        "note": " ".join(extrapolate.__doc__.split("\n\n")[1].split()),
    })
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mockingjay-base")
    p.add_argument("--speakers", type=int, default=10)
    p.add_argument("--utterances", type=int, default=20, help="utterances per speaker")
    p.add_argument("--corpus", help="use this corpus directory instead of synthesising one")
    p.add_argument("--work", help="working directory (default: a temporary one, deleted afterwards)")
    p.add_argument("--extract-precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on a CPU with AMX / AVX512-BF16, else fp32")
    p.add_argument("--probe-precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="head matmuls (fp32: as the stored results were measured)")
    p.add_argument("--steps", type=int, default=None, help="override ProbeConfig.steps (MLP heads)")
    p.add_argument("--name", default="probe", help="result file stem")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a CPU shared with other jobs, 1 avoids OpenMP oversubscription)")
    p.add_argument("--recompute", action="store_true",
                   help="only redo the extrapolation of an existing results/<name>.json (no measurement)")
    args = p.parse_args(argv)
    from aviary.evaluate.probe import ProbeConfig

    defaults = ProbeConfig(**({"steps": args.steps} if args.steps else {}))
    if args.recompute:
        import json

        from benchmarks.common import RESULTS_DIR

        old = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        res = extrapolate(old["results"], 30, defaults.patience, defaults.batch_frames)
        res["recomputed_extrapolation"] = True
        print(f"wrote {write_result(args.name, res)}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from aviary.data import load_manifest
    from aviary.evaluate.cache import extract_to_cache, open_cache
    from aviary.evaluate.probe import run_probe
    from aviary.evaluate.tasks import load_splits
    from aviary.evaluate.upstreams import describe_upstream, resolve_upstream

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="aviary-bench-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = Path(args.corpus) if args.corpus else work / "corpus"
        synth_seconds = None
        if not (corpus / "manifest.jsonl").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "aviary", "-q", "synth", "--out", str(corpus), "--speakers",
                            str(args.speakers), "--utterances-per-speaker", str(args.utterances)], check=True)
            synth_seconds = time.perf_counter() - t0
        utts = load_manifest(corpus)
        audio_seconds = sum(u.duration for u in utts)
        mean_duration = audio_seconds / len(utts)
        default_audio = DEFAULT_SPEAKERS * DEFAULT_UTTERANCES * mean_duration
        scale = default_audio / audio_seconds

        upstream, name = resolve_upstream(f"random:{args.preset}")
        info = describe_upstream(upstream, name)
        cache_dir = work / "cache"
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        t0 = time.perf_counter()
        stats = extract_to_cache(upstream, utts, cache_dir, name=name, layers="all", dtype="float16",
                                 precision=args.extract_precision, info=info)
        extract_seconds = time.perf_counter() - t0
        cache = open_cache(cache_dir, utterances=utts)
        cache_bytes = sum(f.stat().st_size for f in cache_dir.rglob("*.npy"))
        del upstream

        splits = load_splits(corpus, "phone")
        probes = []
        t_all = time.perf_counter()
        for head in ("linear", "mlp1", "mlp2"):
            for layer in range(info.num_hidden_states):
                cfg = defaults.replace(task="phone", head=head, layer=str(layer), precision=args.probe_precision)
                t0 = time.perf_counter()
                rec = run_probe(cfg, splits, cache=cache)
                wall = time.perf_counter() - t0
                probes.append({"head": head, "layer": layer, "wall_seconds": round(wall, 2),
                               "train_seconds": rec["train_seconds"], "epochs": rec["epochs"],
                               "best_epoch": rec["best_epoch"], "solver": rec.get("solver"),
                               "seconds_per_epoch": (round(rec["train_seconds"] / rec["epochs"], 3)
                                                     if rec["epochs"] else None),
                               "valid_acc": rec["valid_acc"], "test_acc": rec["test_acc"]})
                logging.info("probe %s layer %d: %.1fs, %d epochs, test %.3f", head, layer, wall, rec["epochs"],
                             rec["test_acc"])
        probe_seconds = time.perf_counter() - t_all
        train_frames = sum(cache.length(u.id) for u in splits["train"])
        results = {
            "preset": args.preset, "upstream_params": info.params, "num_hidden_states": info.num_hidden_states,
            "corpus": {"utterances": len(utts), "audio_seconds": round(audio_seconds, 1),
                       "speakers": len({u.speaker for u in utts}), "synth_seconds": synth_seconds,
                       "train_frames": train_frames},
            "extract": {"seconds": round(extract_seconds, 2), "x_real_time": round(audio_seconds / extract_seconds, 1),
                        "precision": stats.precision, "dtype": "float16", "cache_bytes": cache_bytes},
            "probes": probes,
            "probe_precision": args.probe_precision,
            "probe_total_seconds": round(probe_seconds, 1),
            "extrapolated_to_default_corpus": {
                "corpus": f"{DEFAULT_SPEAKERS} speakers x {DEFAULT_UTTERANCES} utterances",
                "audio_seconds": round(default_audio, 0), "scale": round(scale, 2),
                "extract_seconds": round(extract_seconds * scale, 0),
                "probe_seconds": round(probe_seconds * scale, 0),
                "cache_gigabytes": round(cache_bytes * scale / 1e9, 2),
            },
            "torch_threads": torch.get_num_threads(),
            # The CPU is shared: the load average says how contended these timings were.
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        # 30 / 4: the epoch cap and patience of the epoch-based trainer (records that have epochs).
        results = extrapolate(results, 30, 4, defaults.batch_frames)
        path = write_result(args.name, results)
        print(f"extraction: {extract_seconds:.1f} s for {audio_seconds:.0f} s of audio "
              f"({audio_seconds / extract_seconds:.0f}x real time, {stats.precision})")
        print(f"12 probes: {probe_seconds:.1f} s; extrapolated to the default corpus: "
              f"{results['extrapolated_to_default_corpus']['total_minutes']} min in all")
        print(f"wrote {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
