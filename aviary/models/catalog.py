"""The preset catalog: what ``aviary models`` lists, computed once, so that listing needs no torch.

Listing the presets through the registry imports torch (2-4 s of CPU here, before any preset
is described). ``catalog.json`` beside this module holds the listing the registry computes
(``describe_preset`` of every preset, in registry order, and the family names), stamped with
:func:`source_stamp`: a SHA-256 over every ``.py`` file of ``models/`` and of the layers below
it (``SOURCE_UNITS``; ``tests/test_layering.py`` keeps models from importing anything else),
which costs milliseconds, and the version of the torch that ``import torch`` would load.

:func:`preset_catalog` uses a catalog only when its stamp equals the installed sources': the
shipped one, else the user's cache (``$XDG_CACHE_HOME/aviary/models.json``, which the registry's
path refreshes). Otherwise it asks the registry, so an edited, added or removed preset is always
listed as the code now defines it, never from an older listing. Presets registered in the
running process exist only once the registry is imported; then the registry answers too.

Regenerate after changing a preset or a model (a test fails until then)::

    make catalog            # python -m aviary.models.catalog
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from aviary.config import ConfigError
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CATALOG_PATH = Path(__file__).resolve().with_name("catalog.json")
FORMAT = 1

# models/ and every layer below it (DEVELOPING.md, "Layers"): all the code a listing can depend on.
SOURCE_UNITS = ("config", "lengths", "precision", "storage", "audio", "features", "data", "objectives", "models")


def source_files(root: Path = PACKAGE_ROOT) -> list[Path]:
    """Every ``.py`` file of ``SOURCE_UNITS`` under the package directory ``root``, sorted."""
    files: list[Path] = []
    for unit in SOURCE_UNITS:
        if (root / unit).is_dir():
            files += (root / unit).rglob("*.py")
        elif (root / f"{unit}.py").is_file():
            files.append(root / f"{unit}.py")
    return sorted(files)


def _torch_version() -> str | None:
    # The __version__ in torch/version.py of the torch `import torch` would load, read without
    # importing it (importlib.metadata takes ~0.2 s here; this, milliseconds).
    try:
        spec = importlib.util.find_spec("torch")
        text = (Path(spec.origin).parent / "version.py").read_text()
    except (ImportError, AttributeError, TypeError, OSError):
        return None
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def source_stamp(root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """What a catalog must have been computed from to be used: ``{"format", "sources", "torch"}``.

    ``sources`` hashes the relative path and the bytes of each of :func:`source_files`, so an
    edited, added, removed or renamed file changes it.
    """
    h = hashlib.sha256()
    for path in source_files(root):
        data = path.read_bytes()
        h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return {"format": FORMAT, "sources": h.hexdigest(), "torch": _torch_version()}


def user_cache_path() -> Path:
    """``$XDG_CACHE_HOME/aviary/models.json`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aviary" / "models.json"


def _read(path: Path, stamp: dict[str, Any], shipped: bool) -> dict[str, Any] | None:
    # Other sources' catalog (a developer's edit, another torch): the registry's turn, quietly.
    # A damaged one: also the registry's turn, and a shipped one is worth a warning.
    try:
        cat = json.loads(path.read_text())
        problem = None if isinstance(cat, dict) else "not a JSON object"
    except FileNotFoundError:
        cat, problem = None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        cat, problem = None, f"unreadable ({e})"
    if problem is None and cat.get("stamp") == stamp:
        if isinstance(cat.get("presets"), list) and isinstance(cat.get("families"), list):
            return cat
        problem = "no 'presets' / 'families' lists"
    if problem is not None:
        (log.warning if shipped else log.debug)("%s: %s; listing the presets through the registry", path, problem)
    return None


def matching_catalog() -> dict[str, Any] | None:
    """The shipped catalog or the user's cached one when its stamp is the installed sources', else None."""
    stamp = source_stamp()
    for path, shipped in ((CATALOG_PATH, True), (user_cache_path(), False)):
        cat = _read(path, stamp, shipped)
        if cat is not None:
            log.debug("preset listing from %s", path)
            return cat
    return None


def build_catalog() -> dict[str, Any]:
    """The catalog the registry computes now: ``{"stamp", "families", "presets": [[name, info], ...]}``."""
    stamp = source_stamp()  # of the files about to be imported
    from aviary.models.registry import FAMILIES, describe_preset, list_presets  # imports torch

    presets = [[name, describe_preset(name)] for name in list_presets()]
    return {"stamp": stamp, "families": sorted(FAMILIES), "presets": presets}


def _dumps(cat: dict[str, Any]) -> str:
    # Not key-sorted: the presets keep the registry's order, each summary describe_preset's.
    return json.dumps(cat, indent=1) + "\n"


def write_user_cache(cat: dict[str, Any]) -> None:
    """Store ``cat`` as the user's cached catalog; a cache that cannot be written is only logged."""
    path = user_cache_path()
    try:
        write_text_atomic(path, _dumps(cat))
    except (OSError, RuntimeError) as e:  # storage's CheckpointError is a RuntimeError
        log.debug("preset listing not cached in %s: %s", path, e)


def preset_catalog() -> dict[str, Any]:
    """The catalog of every preset the running process knows, computed at most once per source stamp.

    Without torch when :func:`matching_catalog` finds one; otherwise from the registry, and the
    result is cached for the next process when the registry held only the presets it discovers.
    """
    fresh = "aviary.models.registry" not in sys.modules
    if fresh:  # else presets may have been registered in this process: only the registry knows them
        cat = matching_catalog()
        if cat is not None:
            return cat
    cat = build_catalog()
    if fresh:
        write_user_cache(cat)
    return cat


def check_family(cat: dict[str, Any], name: str) -> None:
    """Raise the registry's error for a family the catalog does not hold."""
    if name not in cat["families"]:
        raise ConfigError(f"unknown model family {name!r}; known: {cat['families']}")


def main() -> None:
    """``python -m aviary.models.catalog``: write ``catalog.json`` from the registry."""
    cat = build_catalog()
    write_text_atomic(CATALOG_PATH, _dumps(cat))
    print(f"{CATALOG_PATH}: {len(cat['presets'])} presets, sources {cat['stamp']['sources'][:12]}, "
          f"torch {cat['stamp']['torch']}")


if __name__ == "__main__":
    main()
