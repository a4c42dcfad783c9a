"""`aviary tokenize`: a corpus -> vq-wav2vec token sequences + vocabulary (for token-BERT)."""
from __future__ import annotations

import argparse
import json
import logging

from aviary.cli import register

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  aviary tokenize --checkpoint runs/vq-gumbel --data corpora/synth --out tokens/synth
  aviary pretrain --model token-bert-cpu --data tokens/synth --out runs/tbert
Run the same command again to resume: finished shards are skipped.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="vq-wav2vec run directory or weights file")
    p.add_argument("--data", required=True, metavar="CORPUS",
                   help="corpus directory (train/valid/test splits kept) or a manifest file (all = train)")
    p.add_argument("--out", required=True, metavar="TOKENS_DIR", help="token corpus directory to write")
    p.add_argument("--shard-size", type=int, default=200, help="utterances per resumable shard")
    p.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    from aviary.evaluate.tokenize import tokenize_corpus

    meta = tokenize_corpus(args.checkpoint, args.data, args.out, shard_size=args.shard_size,
                           batch_seconds=args.batch_seconds, device=args.device)
    log.info("wrote %s: vocabulary %d ids (%d of %d possible pairs seen), splits %s, %s",
             args.out, meta["vocab_size"], meta["vocab_size"] - meta["num_special"], meta["possible_pairs"],
             json.dumps(meta["splits"]), json.dumps(meta["speed"]))
    return 0


register("tokenize", "turn a corpus into vq-wav2vec tokens and their vocabulary (resumable)",
         add_arguments, run)
