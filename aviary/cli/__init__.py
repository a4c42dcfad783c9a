"""`aviary <verb>`: thin command-line wiring.

Each module in this package registers its verbs with :func:`register`: a name, a one-line
help, a function adding the verb's arguments, and a function running it. Verb functions only
parse and call library code; no logic lives here. They import that library code inside
the verb function: `aviary --help` (which loads every verb module) then imports neither torch
nor anything the other verbs need.
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
_MODULES = ["data", "models", "pretrain", "evaluate", "analysis", "interop", "tokens", "targets"]


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
    except BrokenPipeError:
        # `aviary info RUN | head`: the reader has what it wanted. Quiet, and the status a
        # shell gives a command killed by SIGPIPE (128 + 13), as `cat` would end.
        _silence_stdout()
        return 141
    except (ValueError, OSError, RuntimeError) as e:
        # Library errors carry the file / key / value in their message: show it, not a traceback.
        if args.verbose:
            raise
        log.error("%s", describe_error(e))
        return 2
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 141
    return int(rc or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def describe_error(e: BaseException) -> str:
    """The message shown for a library error: OS errors get the file and a plain reason."""
    import errno

    if not isinstance(e, OSError):
        return str(e)
    where = e.filename
    reason = {
        errno.ENOSPC: "no space left on device (disk full)",
        errno.EEXIST: "exists and is not a directory (a file is in the way); choose another path",
        errno.ENOTDIR: "a part of this path is a file, not a directory; choose another path",
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
    }.get(e.errno)
    if where is None:
        return str(e) if reason is None else f"{reason}: {e}"
    if reason is None:
        return f"{where}: {e.strerror or e}"
    detail = f" ({e.strerror})" if e.strerror and e.errno not in (errno.EEXIST, errno.ENOTDIR) and \
        e.strerror.lower() not in reason else ""
    return f"{where}: {reason}{detail}"


if __name__ == "__main__":
    sys.exit(main())
