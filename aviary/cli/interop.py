"""`aviary import`, `aviary export`, `aviary info`: checkpoints in and out of aviary."""
from __future__ import annotations

import argparse
import json
import logging

from aviary.cli import register

log = logging.getLogger(__name__)


def _import_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    s = sub.add_parser("s3prl", help="s3prl Mockingjay / TERA / Audio ALBERT upstream checkpoint (.ckpt)")
    s.add_argument("checkpoint", metavar="CKPT")
    s.add_argument("--out", required=True, metavar="RUN_DIR", help="aviary run directory to create")
    s = sub.add_parser("ssast", help="released SSAST checkpoint (.pth)")
    s.add_argument("checkpoint", metavar="CKPT")
    s.add_argument("--out", required=True, metavar="RUN_DIR", help="aviary run directory to create")


def _import_run(args: argparse.Namespace) -> int:
    if args.source == "s3prl":
        from aviary.interop.s3prl import import_s3prl_checkpoint

        path = import_s3prl_checkpoint(args.checkpoint, args.out)
    else:
        from aviary.interop.ssast import import_ssast_checkpoint

        path = import_ssast_checkpoint(args.checkpoint, args.out)
    log.info("wrote %s; load it with aviary.load(%r)", path, str(args.out))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    s = sub.add_parser("s3prl", help="s3prl upstream checkpoint for mockingjay_local / tera_local / "
                                     "audio_albert_local (SUPERB)")
    s.add_argument("run", metavar="RUN_DIR", help="aviary run directory or bundle file (mam family)")
    s.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    s = sub.add_parser("s3prl-upstream", help="s3prl upstream package running aviary itself, any family "
                                              "(drop DIR into s3prl's upstream/; -u aviary_local)")
    s.add_argument("run", metavar="RUN_DIR", help="aviary run directory or bundle file (any family)")
    s.add_argument("--out", required=True, metavar="DIR", help="package folder to create")


def _export_run(args: argparse.Namespace) -> int:
    if args.target == "s3prl-upstream":
        from aviary.interop.s3prl_upstream import export_s3prl_upstream

        out = export_s3prl_upstream(args.run, args.out)
        log.info("wrote %s; copy it to s3prl/upstream/aviary, add `from s3prl.upstream.aviary.hubconf import *` "
                 "to s3prl/hub.py, then run_downstream.py -u aviary_local -k %s", out, out / "model.safetensors")
        return 0
    from aviary.interop.s3prl import export_s3prl_checkpoint

    path = export_s3prl_checkpoint(args.run, args.out)
    log.info("wrote %s; in s3prl: -u mockingjay_local -k %s (or tera_local / audio_albert_local)", path, path)
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory, bundle (.safetensors), or s3prl:CKPT")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def _info_run(args: argparse.Namespace) -> int:
    from aviary.hub import describe, format_description

    d = describe(args.checkpoint)
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else format_description(d))
    return 0


register("import", "import another toolkit's checkpoint as an aviary run directory", _import_args, _import_run)
register("export", "export an aviary model in another toolkit's checkpoint format", _export_args, _export_run)
register("info", "describe a checkpoint: model, preset, parameters, front-end, steps, corpus", _info_args, _info_run)
