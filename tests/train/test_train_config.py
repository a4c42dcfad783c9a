"""TrainConfig ranges and recipe resolution: bad keys and values fail before any work."""
from pathlib import Path

import pytest

import tiny  # noqa: F401  (registers the tiny-test family)
from aviary.config import ConfigError
from aviary.train.config import TrainConfig
from aviary.train.recipe import read_recipe, resolve_configs


def test_defaults_follow_s3prl():
    c = TrainConfig()
    assert (c.warmup_fraction, c.weight_decay, c.grad_clip) == (0.07, 0.01, 5.0)
    assert TrainConfig(steps=1000).warmup_steps == 70


@pytest.mark.parametrize("key,value,allowed", [
    ("steps", 0, "[1, inf]"), ("lr", 0.0, "(0.0, inf]"), ("warmup_fraction", 1.0, "[0.0, 1.0)"),
    ("weight_decay", -0.1, "[0.0, 1.0]"), ("grad_accum", 0, "[1, inf]"), ("beta2", 1.0, "[0.0, 1.0)"),
    ("keep_last", 0, "[1, inf]"), ("max_nonfinite_steps", 0, "[1, inf]"), ("num_workers", -1, "[0, 64]"),
    ("precision", "fp8", "one of"), ("device", "tpu", "auto, cpu, cuda"),
    ("crop_seconds", 100.0, "<= max_batch_seconds"),
])
def test_out_of_range_names_key_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{key: value})
    assert f"'{key}'" in str(e.value) and allowed in str(e.value)


def test_mistyped_values_and_keys():
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        TrainConfig.from_dict({"steps": "ten"})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 1e-3})


def test_overrides_are_routed_and_checked():
    m, t = resolve_configs("tiny-test", overrides=["train.lr=1e-3", "hidden=8", "model.dropout=0",
                                                   "grad_accum=2"], steps=7)
    assert (t.lr, t.grad_accum, t.steps, m.hidden, m.dropout) == (1e-3, 2, 7, 8, 0.0)
    with pytest.raises(ConfigError, match="unknown config key 'lern_rate'"):
        resolve_configs("tiny-test", overrides=["lern_rate=1"])
    with pytest.raises(ConfigError, match="unknown config key 'lern_rate' for TrainConfig"):
        resolve_configs("tiny-test", overrides=["train.lern_rate=1"])
    with pytest.raises(ConfigError, match="'lr' = -1.0 is invalid"):
        resolve_configs("tiny-test", overrides=["lr=-1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        resolve_configs("tiny-test", overrides=["lr"])
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        resolve_configs("nope")
    with pytest.raises(ConfigError, match="no model given"):
        resolve_configs(None)


def test_recipe_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("preset: tiny-test\nmodel: {hidden: 12}\ntrain: {steps: 5, lr: 1.0e-3}\n")
    m, t = resolve_configs(None, p, overrides=["train.lr=2e-3"])
    assert (m.hidden, t.steps, t.lr) == (12, 5, 2e-3)  # command line wins over the recipe
    p.write_text("preset: tiny-test\ntrian: {steps: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['trian'\]"):
        read_recipe(p)
    p.write_text("preset: tiny-test\ntrain: {stepz: 5}\n")
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        resolve_configs(None, p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_recipe(p)


SHIPPED_RECIPES = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(SHIPPED_RECIPES) >= 10, SHIPPED_RECIPES


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_resolve(recipe):
    """Every recipe in configs/ names a registered preset and resolves: a renamed or removed
    preset fails here, naming the recipe."""
    from aviary.models.registry import list_presets

    preset = read_recipe(recipe).get("preset")
    assert preset in list_presets(), f"{recipe.name}: preset {preset!r} is not registered"
    model_cfg, train_cfg = resolve_configs(None, recipe)
    assert model_cfg.family and train_cfg.steps > 0


def test_cli_rejects_bad_keys_before_any_work(tmp_path, caplog):
    from aviary.cli import main

    out = tmp_path / "run"
    for bad, msg in [("train.lern_rate=1", "unknown config key 'lern_rate'"),
                     ("train.grad_clip=-1", "'grad_clip' = -1.0 is invalid: allowed [0.0, inf]"),
                     ("hiddn=3", "unknown config key 'hiddn'")]:
        caplog.clear()
        assert main(["pretrain", "--model", "tiny-test", "--data", str(tmp_path / "nowhere"),
                     "--out", str(out), bad]) == 2
        assert msg in caplog.text
    assert not out.exists()  # nothing was created
    assert main(["pretrain", "--model", "tiny-test", "--data", str(tmp_path / "nowhere"),
                 "--out", str(out)]) == 2
    assert "no such manifest file or corpus directory" in caplog.text and not out.exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
@pytest.mark.parametrize("key", ["train.lr", "train.grad_clip", "model.dropout"])
def test_nonfinite_values_are_refused(key, value):
    # "inf" passed the range check "(0.0, inf]" and trained a NaN model.
    with pytest.raises(ConfigError, match=rf"'{key.split('.')[1]}' = '{value}' is invalid: allowed a finite number"):
        resolve_configs("tiny-test", overrides=[f"{key}={value}"], steps=5)
    with pytest.raises(ConfigError, match="finite"):
        TrainConfig(lr=float(value))
