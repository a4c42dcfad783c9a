"""`aviary analyze attention` and `aviary demo`: the study's analysis and the whole study."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

from aviary.cli import register

log = logging.getLogger(__name__)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    a = sub.add_parser("attention", help="Jensen-Shannon divergence between the attention maps of every "
                       "pair of layers (L x L heatmap, per-head matrices in the JSON)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="run directory or weights file of a Mockingjay / AALBERT / TERA model")
    a.add_argument("--data", required=True, metavar="CORPUS",
                   help="corpus directory (its valid split is used) or manifest file")
    a.add_argument("--out", required=True, metavar="DIR", help="writes attention_jsd.json and attention_jsd.png")
    a.add_argument("--utterances", type=int, default=32, help="shortest N utterances to average over")
    from aviary.cli.evaluate import add_precision_args

    add_precision_args(a, "forward-pass")
    a.add_argument("--name", help="display name (default: the run directory's name)")


def _analyze_run(args: argparse.Namespace) -> int:
    from aviary.analysis.demo import analyze_attention
    from aviary.cli.evaluate import precision_arg

    d = analyze_attention(args.checkpoint, args.data, args.out, name=args.name,
                          utterances=args.utterances, precision=precision_arg(args))
    L = d["num_layers"]
    rows = ["layer " + " ".join(f"{j + 1:>5d}" for j in range(L))]
    rows += [f"{i + 1:>5d} " + " ".join(f"{d['matrix'][i][j]:5.3f}" for j in range(L)) for i in range(L)]
    print(f"attention JSD (bits) of {d['name']} over {d['num_utterances']} utterances, "
          f"{d['num_queries']} query positions ({d.get('precision')}):")
    print("\n".join(rows))
    print(f"adjacent-layer mean {d['adjacent_mean']:.3f}, all pairs {d['off_diagonal_mean']:.3f}; "
          f"written to {args.out}/attention_jsd.json and .png")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: corpus/, runs/, probes/, analysis/, summary.json, report.html")
    p.add_argument("--quick", action="store_true",
                   help="toy size (tiny corpus, tiny models, few steps): about 2 minutes")
    p.add_argument("--steps", type=int, help="pretraining steps per model (same for both models)")
    p.add_argument("--seeds", type=int, help="pretrain and probe both models with this many seeds "
                   "(seed, seed + 1, ...) and report mean and spread")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="pretraining, extraction, probes and analysis (default auto: bf16 where native)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="other DemoConfig settings, e.g. speakers=20 utterances_per_speaker=25 lr=5e-4 "
                        "(see aviary/analysis/demo.py)")


def _demo_run(args: argparse.Namespace) -> int:
    from aviary.analysis.demo import DemoConfig, run_demo
    from aviary.analysis.report import format_key_results

    from aviary.config import apply_overrides

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    if args.seeds is not None:
        cfg = cfg.replace(seeds=args.seeds)
    if args.precision is not None:
        cfg = cfg.replace(precision=args.precision)
    cfg = apply_overrides(cfg, args.overrides)
    command = "aviary " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = run_demo(args.out, cfg, quick=args.quick, command=command)
    print()
    for name, m in summary["models"].items():
        if m.get("learned") is False:
            # Said first: every comparison below leaves this model out.
            print(f"WARNING: {name} did not learn (final validation loss "
                  f"{m.get('final_plateau_loss', m['final_valid_loss']):.4f} = {100 * m['plateau_ratio']:.1f} % "
                  f"of {m.get('plateau', 'the utterance-mean predictor L1')}; learned: <= "
                  f"{100 * m['learned_ratio']:.0f} %); no comparison is drawn from it.")
    print("Key results: test accuracy (%) of frozen probes; (layer) = best layer on validation")
    print(format_key_results(summary["key_results"]))
    print()
    for s in summary["findings"]:
        print("- " + s)
    print(f"\nreport: {args.out}/report.html   summary: {args.out}/summary.json   "
          f"wall time {summary['demo']['wall_seconds'] / 60:.1f} min")
    return 0


register("analyze", "analyse a pretrained model (attention JSD between layers)", _analyze_args, _analyze_run)
register("demo", "the whole Audio ALBERT study end to end: synthetic corpus, pretraining, probing, "
         "attention analysis, report (--quick: toy size)", _demo_args, _demo_run)
