"""`aviary targets kmeans`: frame targets for HuBERT-style pretraining (k-means cluster ids)."""
from __future__ import annotations

import argparse
import json
import logging

from aviary.cli import register

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  aviary targets kmeans --features mfcc --clusters 100 --downsample 3 --normalize utterance \\
      --data corpora/synth --out targets/mfcc
  aviary pretrain --model hubert-cpu --data corpora/synth --targets targets/mfcc --out runs/hubert-it0
  aviary targets kmeans --features runs/hubert-it0:4 --clusters 500 --data corpora/synth --out targets/it1
Targets are at the encoder's frame rate: --downsample R (10 ms frames per target) must be the
model's R for mfcc; a checkpoint's layer is at that model's rate. --normalize utterance
(per-utterance CMVN of the MFCC before k-means) is what hubert-cpu's targets use (noisy
corpora); the default, none, is the paper's (fairseq) recipe. Run the same command again to
continue a killed run (the fitted centroids and finished shards are kept).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="targets_kind", metavar="KIND", required=True)
    k = sub.add_parser("kmeans", help="k-means cluster ids of MFCC or of a model's layer (HuBERT)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    k.add_argument("--features", default="mfcc", metavar="mfcc|CHECKPOINT:LAYER",
                   help="what to cluster: 39-dim MFCC, or hidden state LAYER of an aviary run / weights file")
    k.add_argument("--clusters", type=int, default=100, metavar="K", help="number of clusters")
    k.add_argument("--data", required=True, metavar="CORPUS",
                   help="corpus directory (fit on its train split, label every utterance) or manifest file")
    k.add_argument("--out", required=True, metavar="DIR", help="targets directory to write")
    k.add_argument("--downsample", type=int, default=None, metavar="R",
                   help="mfcc: 10 ms frames per target frame, the encoder's R (default 1)")
    k.add_argument("--seed", type=int, default=0, help="k-means seed")
    k.add_argument("--fit-frames", type=int, default=200_000, help="at most this many frames are clustered")
    k.add_argument("--normalize", choices=("none", "utterance"), default="none",
                   help="mfcc: per-utterance CMVN of the MFCC before k-means ('utterance', hubert-cpu's "
                        "setting) or none (the paper's)")


def run(args: argparse.Namespace) -> int:
    from aviary.config import ConfigError
    from aviary.train.targets import KMeansTargetsConfig, make_kmeans_targets, targets_summary

    if args.features != "mfcc" and args.downsample is not None:
        raise ConfigError("--downsample is for --features mfcc; a checkpoint's layer is at its own frame rate")
    cfg = KMeansTargetsConfig(features=args.features, clusters=args.clusters,
                              downsample=(args.downsample or 1) if args.features == "mfcc" else 0,
                              seed=args.seed, fit_frames=args.fit_frames, normalize=args.normalize)
    upstream = None
    if args.features != "mfcc":
        import aviary

        upstream = aviary.load(args.features.rpartition(":")[0])
    make_kmeans_targets(args.data, args.out, cfg, upstream=upstream, progress=True)
    log.info("wrote %s", json.dumps(targets_summary(args.out)))
    return 0


register("targets", "frame targets for HuBERT-style pretraining: `aviary targets kmeans` (resumable)",
         add_arguments, run)
