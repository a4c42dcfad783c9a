"""The preset catalog `aviary models` lists from (aviary/models/catalog.json): it is exactly what
the registry computes, and its stamp changes whenever code that could change a listing changes."""
import json
import shutil

import pytest

import aviary
from aviary.models import catalog
from aviary.models.registry import FAMILIES, describe_preset, list_presets
from tests.test_layering import LAYERS

REGENERATE = "regenerate it: `make catalog` (or `python -m aviary.models.catalog`)"


def _fresh_catalog():
    """What `make catalog` computes, in a fresh process: this one holds presets and families
    that other tests register (tests/train/tiny.py)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(aviary.__file__).parent.parent
    code = "import json; from aviary.models.catalog import build_catalog; print(json.dumps(build_catalog()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_shipped_catalog_is_what_the_registry_computes():
    shipped = json.loads(catalog.CATALOG_PATH.read_text())
    assert shipped["stamp"] == catalog.source_stamp(), \
        f"{catalog.CATALOG_PATH} was made from other sources than these: {REGENERATE}"
    fresh = _fresh_catalog()
    computed = fresh["presets"]
    differ = sorted({n for n, _ in computed} ^ {n for n, _ in shipped["presets"]}
                    | {n for (n, d), (m, e) in zip(computed, shipped["presets"]) if (n, d) != (m, e)})
    assert shipped["presets"] == computed, f"{catalog.CATALOG_PATH} differs for {differ}: {REGENERATE}"
    assert shipped == fresh  # what `make catalog` writes, families included
    # ... and each entry is describe_preset's, in the registry's order, here as well.
    here = dict((n, describe_preset(n)) for n in list_presets())
    assert [n for n in list_presets() if n in dict(computed)] == [n for n, _ in computed]
    assert all(json.loads(json.dumps(here[n])) == d for n, d in computed)
    assert set(shipped["families"]) <= set(FAMILIES)
    assert catalog.matching_catalog() == shipped


def test_the_stamp_covers_models_and_every_layer_below_it():
    # models/ may import only these (tests/test_layering.py), so no other module can change a listing.
    top = next(i for i, band in enumerate(LAYERS) if "models" in band)
    below = [unit for band in LAYERS[: top + 1] for unit in band]
    assert sorted(catalog.SOURCE_UNITS) == sorted(below)
    root = aviary.__file__.rsplit("/", 1)[0]
    files = {p.relative_to(root).as_posix() for p in catalog.source_files()}
    assert {"models/registry.py", "models/mam_presets.py", "objectives/base.py", "config.py",
            "features/__init__.py", "models/catalog.py"} <= files
    assert not any(f.startswith(("evaluate/", "cli/", "train/", "analysis/")) for f in files)


@pytest.fixture
def package_copy(tmp_path):
    root = tmp_path / "aviary"
    shutil.copytree(aviary.__file__.rsplit("/", 1)[0], root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_any_change_to_those_sources_changes_the_stamp(package_copy):
    stamp = catalog.source_stamp(package_copy)
    assert stamp == catalog.source_stamp()
    presets = package_copy / "models" / "mam_presets.py"
    presets.write_text(presets.read_text().replace("Test-sized Mockingjay: 64/2L", "Test-sized Mockingjay: 64/2 layers"))
    edited = catalog.source_stamp(package_copy)
    assert edited["sources"] != stamp["sources"]
    (package_copy / "models" / "my_family.py").write_text("")  # a new family module is found by discovery
    added = catalog.source_stamp(package_copy)
    assert added["sources"] not in (stamp["sources"], edited["sources"])
    # Code above models/ cannot change a listing: editing it keeps the stamp (and the fast path).
    (package_copy / "evaluate" / "probe.py").write_text("# not below models")
    (package_copy / "cli" / "models.py").unlink()
    assert catalog.source_stamp(package_copy) == added


def test_a_missing_damaged_or_foreign_catalog_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = json.loads(catalog.CATALOG_PATH.read_text())
    for name, text in [("missing", None), ("garbage", "{not json"), ("list", "[]"),
                       ("other-torch", json.dumps({**good, "stamp": {**good["stamp"], "torch": "1.0"}})),
                       ("other-sources", json.dumps({**good, "stamp": {**good["stamp"], "sources": "0" * 64}})),
                       ("no-presets", json.dumps({"stamp": good["stamp"]}))]:
        path = tmp_path / f"{name}.json"
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(catalog, "CATALOG_PATH", path)
        caplog.clear()
        assert catalog.matching_catalog() is None, name
        # Another stamp is normal after an edit; a damaged shipped catalog is named.
        assert (str(path) in caplog.text) == (name in ("missing", "garbage", "list", "no-presets")), name


def test_the_user_cache_is_used_only_for_its_own_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = json.loads(catalog.CATALOG_PATH.read_text())
    monkeypatch.setattr(catalog, "CATALOG_PATH", tmp_path / "absent.json")
    assert catalog.matching_catalog() is None
    catalog.write_user_cache(good)
    assert catalog.user_cache_path() == tmp_path / "cache" / "aviary" / "models.json"
    assert catalog.matching_catalog() == good
    catalog.write_user_cache({**good, "stamp": {**good["stamp"], "sources": "0" * 64}})
    assert catalog.matching_catalog() is None


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the directory should be
    catalog.write_user_cache(json.loads(catalog.CATALOG_PATH.read_text()))


def test_preset_order_does_not_depend_on_what_was_imported_first():
    # The listing (and the catalog made from it) must not change with a process's import
    # history: under the full test suite another module's presets registered first.
    import subprocess
    import sys

    code = ("import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
            "from aviary.models.registry import list_presets; print(','.join(list_presets()))")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first = subprocess.run([sys.executable, "-c", code, "aviary.models.vqwav2vec", "aviary.models.token_bert"],
                           capture_output=True, text=True, check=True).stdout
    assert plain == first and plain.count(",") > 10
