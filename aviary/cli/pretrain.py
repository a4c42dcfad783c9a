"""`aviary pretrain`: pretrain a model preset on a corpus."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from aviary.cli import register
from aviary.cli.evaluate import add_compile_arg

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  aviary pretrain --model mockingjay-small --data corpora/synth --out runs/mj-small --steps 2000
  aviary pretrain --model aalbert-3l --data corpora/synth/train.jsonl --out runs/aa3 \\
      train.lr=4e-4 train.grad_accum=4 model.encoder.dropout=0.0
  aviary pretrain --out runs/mj-small --resume            # continue after a crash or Ctrl-C
  aviary pretrain --model hubert-cpu --data corpora/synth --targets targets/mfcc --out runs/hubert
  torchrun --nproc_per_node 2 -m aviary pretrain ...      # DistributedDataParallel

Overrides are model.KEY=VALUE or train.KEY=VALUE (bare KEY=VALUE when KEY is unambiguous).
Train keys: steps lr warmup_fraction min_lr_ratio weight_decay beta1 beta2 eps grad_clip
grad_accum max_batch_seconds max_batch_tokens crop_seconds min_seconds precision
(auto|fp32|bf16|fp16) seed log_every val_every val_batches checkpoint_every keep_last
max_nonfinite_steps min_usable_fraction num_workers device tensorboard. Ctrl-C or SIGTERM writes a checkpoint
and exits; a second Ctrl-C exits at once.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("--model", metavar="PRESET",
                   help="model preset (see `aviary models`); optional with --resume or a recipe "
                        "that names one")
    p.add_argument("--data", metavar="CORPUS",
                   help="corpus directory (train.jsonl trains, valid.jsonl validates) or a "
                        "manifest file; optional with --resume")
    p.add_argument("--out", metavar="RUN_DIR", required=True,
                   help="run directory: checkpoints, metrics.jsonl, tb/, model.safetensors")
    p.add_argument("--targets", metavar="DIR",
                   help="frame targets of the corpus (`aviary targets kmeans`), for the hubert-* presets "
                        "(sets model.objective.targets)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (sets train.steps)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="sets train.precision (default auto: bf16 on CUDA or a CPU with AMX / AVX512-BF16, "
                        "else fp32 on a CPU, fp16 with loss scaling on an older GPU)")
    add_compile_arg(p)
    p.add_argument("--config", metavar="YAML",
                   help="recipe file with 'preset', 'model' and 'train' keys (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in RUN_DIR (starts fresh "
                        "when there is none)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4 model.encoder.num_layers=3")


def run(args: argparse.Namespace) -> int:
    from aviary.config import ConfigError
    from aviary.models.registry import config_from_dict
    from aviary.train.checkpoint import read_json, stored_run_config
    from aviary.train.config import TrainConfig
    from aviary.train.loop import pretrain
    from aviary.train.recipe import resolve_configs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a run directory; choose another --out")
    run_json = out / "run.json"
    base = None
    data = args.data
    if args.resume and run_json.is_file():
        stored = read_json(run_json)
        base = (config_from_dict(stored["model"]), TrainConfig.from_dict(stored["train"]))
        data = data or stored.get("data")
    elif args.resume:
        found = stored_run_config(out)
        if found is None and args.model is None and args.config is None:
            raise ConfigError(f"{run_json}: not found and {out} has no checkpoint, so there is nothing "
                              "to resume; start the run with --model PRESET --data CORPUS")
        if found is not None and args.model is None and args.config is None:
            log.warning("%s is missing: taking the model and train settings from %s", run_json, found[0])
            base = (config_from_dict(found[1]["model"]), TrainConfig.from_dict(found[1]["train"]))
        if data is None:
            raise ConfigError(f"{run_json}: not found, so the run's corpus is unknown; pass --data CORPUS")
    overrides = list(args.overrides) + ([f"train.precision={args.precision}"] if args.precision else [])
    if args.targets:
        overrides.append(f"model.objective.targets={Path(args.targets).resolve()}")
    model_cfg, train_cfg = resolve_configs(args.model, args.config, overrides, args.steps, base=base)
    if data is None:
        raise ConfigError("no training data: pass --data CORPUS (a corpus directory or manifest)")
    result = pretrain(model_cfg, train_cfg, data, args.out, resume=args.resume, compile=args.compile)
    summary = {"run_dir": str(result.run_dir), "step": result.step,
               "interrupted": result.interrupted, "train_loss": result.train_loss,
               "valid_loss": result.valid_loss, "nonfinite_steps": result.nonfinite_steps}
    log.info("done: %s", json.dumps(summary))
    return 0


register("pretrain", "pretrain a model preset on a corpus (resumable, multi-process with torchrun)",
         add_arguments, run)
