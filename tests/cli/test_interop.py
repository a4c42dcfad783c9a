"""`aviary import`, `aviary export`, `aviary info` (aviary/cli/interop.py)."""
import json

from aviary.cli import main as cli_main
from aviary.hub import describe, format_description
from aviary.models.registry import build_pretrain
from aviary.models.registry import get_preset
from aviary.storage import FORMAT_VERSION
from aviary.train.checkpoint import save_checkpoint


def test_info_describes_a_training_run(tmp_path, capsys):
    cfg = get_preset("aalbert-tiny")
    model = build_pretrain(cfg)
    run = tmp_path / "run"
    config = {"model": cfg.to_dict(), "train": {"steps": 400}, "step": 200, "format_version": FORMAT_VERSION}
    save_checkpoint(run, 200, model.state_dict(), config, {}, {"step": 200})
    (run / "run.json").write_text(json.dumps({"model": cfg.to_dict(), "data": "corpora/synth-100", "git_commit": "abc123"}))
    d = describe(run)
    assert d["preset"] == "aalbert-tiny" and d["family"] == "mam" and d["variant"] == "aalbert"
    assert d["step"] == 200 and d["train_steps"] == 400 and d["data"] == "corpora/synth-100"
    from aviary.models.registry import count_parameters
    assert d["parameters_upstream"] == count_parameters(model.upstream)
    assert cli_main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    for needle in ("aalbert-tiny", "200 steps of 400", "corpora/synth-100", "logmel", "linear", "(shared)", "R=3"):
        assert needle in out, needle
    assert "closest" in format_description({**d, "preset": None, "closest_preset": "x", "differs_from_preset": ["a"]})
