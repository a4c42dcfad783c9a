"""A sweep is described by one SweepPlan; the keyword form of run_sweep builds the same plan."""
import pytest

from aviary.evaluate.results import load_records
from aviary.evaluate.sweep import SweepPlan, run_sweep

from evaluate_fakes import OracleUpstream

FAST = dict(steps=20, patience=5, lr=1e-2, batch_frames=256, batch_utterances=8, hidden=8)


def test_probe_configs_cover_the_grid_in_order():
    plan = SweepPlan(tasks=["phone", "speaker"], heads=["linear", "mlp1"], layers="0,weighted",
                     label_fractions=[0.5, 1.0], seeds=[0, 1], overrides={"steps": 7})
    cfgs = plan.probe_configs(num_hidden_states=3)
    assert len(cfgs) == 2 * 2 * 2 * 2 * 2
    assert [(c.task, c.label_fraction, c.head, c.layer, c.seed) for c in cfgs[:5]] == [
        ("phone", 0.5, "linear", "0", 0), ("phone", 0.5, "linear", "0", 1),
        ("phone", 0.5, "linear", "weighted", 0), ("phone", 0.5, "linear", "weighted", 1),
        ("phone", 0.5, "mlp1", "0", 0)]
    assert all(c.steps == 7 and not c.finetune for c in cfgs)


def test_legacy_autocast_override_is_upgraded():
    (cfg,) = SweepPlan(layers="1", overrides={"autocast": "bf16"}).probe_configs(3)
    assert cfg.precision == "bf16"


def test_plan_and_keywords_give_the_same_records(corpus, oracle_cache, tmp_path):
    grid = dict(tasks=["phone"], heads=["linear", "mlp1"], layers="1", overrides=FAST, progress=False)
    a = run_sweep(OracleUpstream(), corpus, tmp_path / "a", name="oracle", cache=oracle_cache, **grid)
    b = run_sweep(OracleUpstream(), corpus, tmp_path / "b",
                  plan=SweepPlan(name="oracle", cache=oracle_cache, **grid))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in recs]  # noqa: E731
    assert len(a) == 2 and strip(a) == strip(b) == strip(load_records(tmp_path / "b"))


def test_plan_and_fields_together_or_unknown_fields_are_refused(tmp_path):
    with pytest.raises(TypeError, match="not both"):
        run_sweep(None, tmp_path, tmp_path, plan=SweepPlan(), tasks=["phone"])
    with pytest.raises(TypeError, match="head"):
        run_sweep(None, tmp_path, tmp_path, head=["linear"])
