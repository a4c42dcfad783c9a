"""`aviary extract`, `aviary probe`, `aviary results`: the downstream evaluation commands."""
from __future__ import annotations

import argparse
import logging

from aviary.cli import register

log = logging.getLogger(__name__)

_UPSTREAM_HELP = ("run directory or weights file, a front-end baseline (fbank, logmel, logmel+delta) "
                  "or random:PRESET (randomly initialised encoder of a preset, fixed seed)")


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None


def _auto_or_positive(what: str):
    """An argparse type: ``auto``, or a number > 0 (``what`` names it in the error)."""
    def parse(s: str) -> float | str:
        if s.strip().lower() == "auto":
            return "auto"
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is neither 'auto' nor a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{what} {s!r} must be > 0")
        return v
    return parse


_tol = _auto_or_positive("tolerance")
_lr = _auto_or_positive("learning rate")


def _words(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_precision_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--precision`` (and the deprecated ``--autocast`` alias) for a command."""
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
                   help=f"{what} precision (default auto: bf16 where native, i.e. CUDA or a CPU with "
                        "AMX / AVX512-BF16, else fp32; fp16 only on CUDA)")
    p.add_argument("--autocast", choices=("none", "bf16"), default=None,
                   help="deprecated: --autocast none = --precision fp32, bf16 = --precision bf16")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """``--compile``: torch.compile the model's transformer blocks (aviary/train/compile.py)."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) the transformer blocks; slow first steps, eager fallback with "
                        "a warning if compilation fails; checkpoints are the same (see BENCHMARKS.md for when "
                        "it pays)")


def precision_arg(args: argparse.Namespace) -> str:
    """The precision asked for by ``--precision`` / ``--autocast`` (default ``auto``)."""
    from aviary.precision import from_legacy_autocast

    if args.autocast is None:
        return args.precision or "auto"
    legacy = from_legacy_autocast(args.autocast)
    if args.precision is not None and args.precision != legacy:
        raise ValueError(f"--autocast {args.autocast} and --precision {args.precision} disagree; "
                         "give --precision only")
    log.warning("--autocast is deprecated: use --precision %s", legacy)
    return legacy


def _runtime_args(p: argparse.ArgumentParser, skipped: str) -> None:
    """--skip-bad, --device, --threads (extract and probe)."""
    p.add_argument("--skip-bad", action="store_true",
                   help=f"leave out files whose audio does not load ({skipped}) instead of stopping at the first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs 1 can be "
                        "several times faster)")


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="UPSTREAM", help=_UPSTREAM_HELP)
    p.add_argument("--data", required=True, metavar="CORPUS", help="corpus directory or manifest file")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache directory (an interrupted one is resumed)")
    p.add_argument("--layers", default="all", help="'all', 'last' or comma-separated hidden-state indices")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    p.add_argument("--split", help="only this split (train, valid, test, train-spk, ...); default: all utterances")
    add_precision_args(p, "forward-pass")
    add_compile_arg(p)
    p.add_argument("--batch-seconds", type=float, default=80.0, help="padded audio seconds per forward pass")
    p.add_argument("--shard-seconds", type=float, default=600.0, help="audio seconds per shard (unit of resumption)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of random:PRESET")
    p.add_argument("--name", help="display name (default: the run directory's name or the baseline's)")
    _runtime_args(p, "counted, listed in CACHE/index.json")


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _extract_run(args: argparse.Namespace) -> int:
    from aviary.evaluate.sweep import run_extract

    _set_threads(args.threads)
    stats = run_extract(args.checkpoint, args.data, args.out, layers=args.layers, dtype=args.dtype,
                        split=args.split, device=args.device, random_seed=args.seed, name=args.name,
                        precision=precision_arg(args), batch_seconds=args.batch_seconds,
                        shard_seconds=args.shard_seconds, skip_bad=args.skip_bad, compile=args.compile)
    print(f"{stats.path}: {stats.utterances} utterances in {stats.shards_total} shards "
          f"({stats.shards_written} written now, {stats.audio_seconds:.0f} s of audio in {stats.seconds:.1f} s, "
          f"{stats.x_real_time:.0f}x real time, {stats.precision})"
          + (f"; {stats.skipped} unusable files skipped (listed in {stats.path}/index.json)" if stats.skipped else ""))
    return 0


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", metavar="UPSTREAM", help=_UPSTREAM_HELP + "; optional with --cache")
    p.add_argument("--data", required=True, metavar="CORPUS", help="corpus directory or manifest file")
    p.add_argument("--task", type=_words, default=["phone"],
                   help="phone, speaker, keyword, or a comma-separated list")
    p.add_argument("--head", type=_words, default=["linear"], help="linear, mlp1, mlp2, or a comma-separated list")
    p.add_argument("--layers", default="last",
                   help="'all' (every layer), 'last', 'weighted', an index K, or a list such as 'all,weighted'")
    p.add_argument("--label-fraction", type=_floats, default=[1.0],
                   help="fraction(s) of the training labels, e.g. 0.01,0.1,1.0")
    p.add_argument("--seed", type=_ints, default=[0], help="probe seed(s)")
    p.add_argument("--finetune", action="store_true", help="train the upstream with the head (its own --upstream-lr)")
    add_compile_arg(p)
    p.add_argument("--cache", metavar="CACHE", help="existing feature cache from `aviary extract` (frozen mode)")
    p.add_argument("--out", required=True, metavar="DIR", help="results directory (results.jsonl, feature cache)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of mlp heads (default 256; s3prl 768)")
    p.add_argument("--layer-norm", action="store_true", help="parameter-free layer norm per layer before the weighted sum")
    p.add_argument("--solver", choices=("auto", "lbfgs", "adam"), default=None,
                   help="auto (default): frozen linear probes solved by L-BFGS, MLP heads and fine-tuning by AdamW "
                        "on a step budget; adam: AdamW for every head")
    p.add_argument("--l2-grid", type=_floats, default=None,
                   help="L2 strengths tried by the linear solver, chosen on valid (default 1e-1,...,1e-6)")
    p.add_argument("--l2-start", choices=("middle", "strongest"), default=None,
                   help="where the L2 path starts: the grid's middle, going weaker first (default), or the strongest")
    p.add_argument("--tol", type=_tol, default=None,
                   help="solver convergence: max |gradient|, or 'auto' (default): 0.1 / sqrt(training examples)")
    p.add_argument("--max-iter", type=int, default=None, help="L-BFGS iterations per L2 value (default 100)")
    p.add_argument("--lr", type=_lr, default=None,
                   help="AdamW head learning rate, or 'auto' (default): chosen on valid from --lr-grid")
    p.add_argument("--lr-grid", type=_floats, default=None, help="learning rates tried by --lr auto (default 1e-3,3e-3,1e-2)")
    p.add_argument("--lr-extend", type=int, default=None,
                   help="when the grid's largest lr wins, try up to this many x 3 beyond it (default 2)")
    p.add_argument("--lr-per", choices=("probe", "sweep"), default=None,
                   help="--lr auto chosen by every probe (default), or once per sweep: the first probe of each "
                        "task / head / label fraction / seed runs the trials, the others reuse its choice")
    p.add_argument("--steps", type=int, default=None, help="AdamW budget in optimiser steps (default 1000)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between valid evaluations (default steps/10)")
    p.add_argument("--upstream-lr", type=float, default=None, help="upstream learning rate when fine-tuning (default 5e-5)")
    p.add_argument("--patience", type=int, default=None,
                   help="valid evaluations without improvement before stopping (default 4)")
    add_precision_args(p, "extraction, probe and fine-tuning (not part of a probe's key: a probe already in "
                          "results.jsonl is not redone in another precision)")
    p.add_argument("--random-seed", type=int, default=0, help="initialisation seed of random:PRESET")
    p.add_argument("--name", help="display name of the upstream in the results")
    _runtime_args(p, "counted per split in every record as skipped_files")


def _probe_run(args: argparse.Namespace) -> int:
    from aviary.evaluate.results import format_table
    from aviary.evaluate.sweep import run_sweep

    _set_threads(args.threads)
    if args.upstream is None and args.cache is None:
        raise ValueError("give --upstream, --cache, or both")
    pairs = (("hidden", args.hidden), ("upstream_lr", args.upstream_lr), ("steps", args.steps),
             ("patience", args.patience), ("solver", args.solver),
             ("tol", None if args.tol == "auto" else args.tol), ("max_iter", args.max_iter),
             ("eval_every", args.eval_every),
             ("l2_grid", tuple(args.l2_grid) if args.l2_grid else None),
             ("lr_grid", tuple(args.lr_grid) if args.lr_grid else None), ("lr_extend", args.lr_extend),
             ("lr_per", args.lr_per), ("l2_start", args.l2_start))
    overrides = {k: v for k, v in pairs if v is not None}
    if args.lr is not None and args.lr != "auto":
        overrides["lr"] = args.lr
    if args.layer_norm:
        overrides["layer_norm"] = True
    precision = precision_arg(args)
    overrides["precision"] = precision
    recs = run_sweep(args.upstream, args.data, args.out, tasks=args.task, heads=args.head, layers=args.layers,
                     label_fractions=args.label_fraction, seeds=args.seed, finetune=args.finetune, cache=args.cache,
                     name=args.name, overrides=overrides, extract={"precision": precision}, device=args.device,
                     random_seed=args.random_seed, skip_bad=args.skip_bad, compile=args.compile)
    if recs:
        print(format_table(recs))
    else:
        print(f"every requested probe is already in {args.out}/results.jsonl")
    return 0


def _results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="results directory of `aviary probe --out DIR`")


def _results_run(args: argparse.Namespace) -> int:
    from aviary.evaluate.results import summarize

    s = summarize(args.dir)
    print(s["table"])
    print(f"\nwrote {s['csv']}")
    print(f"wrote {s['mean_csv']}")
    for kind, path in s["plots"].items():
        if path:
            print(f"wrote {path}")
    return 0


register("extract", "run an upstream over a corpus once and cache every layer's features (resumable)",
         _extract_args, _extract_run)
register("probe", "train probes (linear / mlp1 / mlp2) on an upstream's layers for phone, speaker or keyword "
         "classification; frozen from the feature cache or fine-tuned", _probe_args, _probe_run)
register("results", "print the probe results table and write results.csv and the probing plots",
         _results_args, _results_run)
