"""`aviary <verb>`: thin command-line wiring.

Each module in this package registers its verbs with :func:`register`: a name, a one-line
help, a function adding the verb's arguments, and a function running it. Verb functions only
parse and call library code; no logic lives here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

log = logging.getLogger("aviary")

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], "int | None"]
VERBS: dict[str, tuple[str, AddArgs, Run]] = {}

# Modules of this package that register verbs, in the order `aviary --help` lists them.
_MODULES = ["data", "models", "pretrain", "evaluate", "analysis", "interop", "tokens"]


def register(name: str, help: str, add_arguments: AddArgs, run: Run) -> None:
    """Register ``aviary <name>``."""
    VERBS[name] = (help, add_arguments, run)


def _load_verbs() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"aviary.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"aviary.cli.{mod}":
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_verbs()
    p = argparse.ArgumentParser(
        prog="aviary",
        description="Self-supervised speech representation learning: make or prepare corpora, "
                    "pretrain Mockingjay / Audio ALBERT / TERA / SSAST / vq-wav2vec + BERT, "
                    "extract every layer, probe phonemes and speakers, analyse attention.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, full tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_, add_args, _run) in VERBS.items():
        sp = sub.add_parser(name, help=help_, description=help_,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_args(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aviary`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verb:
        parser.print_help()
        return 0
    _help, _add, run = VERBS[args.verb]
    try:
        rc = run(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # Library errors carry the file / key / value in their message: show it, not a traceback.
        if args.verbose:
            raise
        log.error("%s", e)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
