"""`aviary models` lists from the shipped catalog without importing torch (issue 17: under 2 s),
prints exactly what the registry computes, and never prints a listing older than the sources."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import aviary
from aviary.cli import main
from aviary.models import registry

PACKAGE = Path(aviary.__file__).parent

# The CLI as the console script runs it, then what the process imported.
RUNNER = """
import json, sys
from aviary.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "aviary": __import__("aviary").__file__}), file=sys.stderr)
"""


def run_cli(args, root, cache):
    """``(stdout, stderr lines, {"rc", "torch", "aviary"})`` of ``aviary ARGS`` in a fresh process
    importing the package under ``root`` and caching under ``cache``."""
    env = {**os.environ, "PYTHONPATH": str(root), "XDG_CACHE_HOME": str(cache)}
    # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
    p = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env, timeout=120,
                       cwd=root)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 0 and lines, p.stderr
    return p.stdout, lines[:-1], json.loads(lines[-1])


def in_this_process(args, capsys):
    """``aviary ARGS`` run by this process's ``main`` (its registry, with whatever it registered)."""
    assert "aviary.models.registry" in sys.modules  # so `main` takes the registry's path
    capsys.readouterr()
    assert main(["-q", *args]) == 0
    return capsys.readouterr().out


def in_process(args, capsys):
    """What the registry's path prints: in a fresh process that imports the registry first (so
    `main` takes that path), not in this one, where other tests register presets of their own
    (tests/train/tiny.py) that the shipped catalog rightly does not hold."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    code = "import sys, aviary.models.registry\nfrom aviary.cli import main\nsys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "-q", *args], capture_output=True, text=True, env=env,
                       timeout=120, cwd=PACKAGE.parent)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("args", [["models", "--json"], ["models"], ["models", "--family", "ssast", "--json"],
                                  ["models", "--family", "vq-wav2vec"]])
def test_the_catalog_path_prints_what_the_registry_prints_and_imports_no_torch(args, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fast, _, proc = run_cli(["-q", *args], PACKAGE.parent, tmp_path / "cache")
    assert proc == {"rc": 0, "torch": False, "aviary": aviary.__file__}
    assert fast == in_process(args, capsys)
    assert not (tmp_path / "cache").exists()  # the shipped catalog matched: nothing to cache


def test_python_m_aviary_models_imports_no_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "aviary", "models", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "aviary.models.catalog" in imported and "json" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy")}, "the listing imported torch"
    assert "mockingjay-base" in json.loads(p.stdout)


def test_unknown_family_on_the_catalog_path_names_the_known_ones(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "XDG_CACHE_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", RUNNER, "models", "--family", "nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and json.loads(p.stderr.strip().splitlines()[-1])["rc"] == 2
    assert "unknown model family 'nope'; known: ['mam', 'ssast', 'token-bert', 'vq-wav2vec']" in p.stderr


def test_edited_presets_are_listed_fresh_then_from_the_user_cache(tmp_path):
    # A copy of the package whose presets differ from its shipped catalog, as after a developer's edit.
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "aviary", ignore=shutil.ignore_patterns("__pycache__"))
    presets = root / "aviary" / "models" / "mam_presets.py"
    old = "Test-sized Mockingjay: 64/2L"
    presets.write_text(presets.read_text().replace(old, "Test-sized Mockingjay: 64/2 layers, edited"))
    cache = tmp_path / "cache"

    out1, _, proc1 = run_cli(["models"], root, cache)
    assert proc1 == {"rc": 0, "torch": True, "aviary": str(root / "aviary" / "__init__.py")}  # the registry's path
    assert "64/2 layers, edited\n" in out1 and old not in out1
    assert json.loads((cache / "aviary" / "models.json").read_text())["stamp"] != \
        json.loads((root / "aviary" / "models" / "catalog.json").read_text())["stamp"]

    out2, _, proc2 = run_cli(["models"], root, cache)
    assert proc2["torch"] is False and out2 == out1  # from the user cache, which has the edit

    presets.write_text(presets.read_text().replace("64/2 layers, edited", "64/2 layers, edited twice"))
    out3, _, proc3 = run_cli(["models"], root, cache)
    assert proc3["torch"] is True and "edited twice" in out3 and "64/2 layers, edited\n" not in out3


def test_presets_registered_in_the_process_are_listed(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    registry.list_presets()
    monkeypatch.setitem(registry.PRESETS, "my-preset", lambda: registry.get_preset("aalbert-tiny"))
    monkeypatch.setitem(registry.PRESET_INFO, "my-preset", "a user's preset")
    table = json.loads(in_this_process(["models", "--json"], capsys))
    assert table["my-preset"] == {**table["aalbert-tiny"], "description": "a user's preset"}
    assert not (tmp_path / "cache").exists()  # a listing with this process's own presets is never cached
