"""`aviary models`: list the model presets with family, parameter count and description."""
from __future__ import annotations

import argparse
import json

from aviary.cli import register


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help='print {name: {"params": int, "family": str, "description": str, ...}}')
    p.add_argument("--family", help="only presets of this family (mam, ssast, vq-wav2vec, token-bert)")


def _run(args: argparse.Namespace) -> int:
    # The catalog, not the registry: it lists without importing torch when the sources match it.
    from aviary.models.catalog import check_family, preset_catalog

    cat = preset_catalog()
    if args.family:
        check_family(cat, args.family)  # unknown family: ConfigError naming the known ones
    table = {n: d for n, d in cat["presets"] if not args.family or d["family"] == args.family}
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    width = max(len(n) for n in table) if table else 10
    print(f"{'preset':<{width}}  {'family':<10}  {'params':>8}  description")
    for n, d in table.items():
        params = "-" if d["params"] is None else f"{d['params'] / 1e6:.2f}M"
        print(f"{n:<{width}}  {d['family']:<10}  {params:>8}  {d['description']}")
    return 0


register("models", "list the model presets with family, parameter count and description", _args, _run)
