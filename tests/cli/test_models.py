"""`aviary models`: every preset listed with an integer parameter count where buildable."""
import json

from aviary.cli import main
from aviary.models.registry import list_presets


def test_models_json_lists_every_preset(capsys):
    assert main(["-q", "models", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == set(list_presets())
    assert table["tera-base"]["params"] == 21_327_360 and table["tera-base"]["family"] == "mam"
    assert table["aalbert-3l"]["params"] == table["aalbert-12l"]["params"]
    for name, d in table.items():
        assert d["params"] is None or isinstance(d["params"], int), name


def test_models_table_filters_by_family(capsys):
    assert main(["-q", "models", "--family", "mam"]) == 0
    out = capsys.readouterr().out
    assert "mockingjay-base" in out and "21.39M" in out and "ssast" not in out
