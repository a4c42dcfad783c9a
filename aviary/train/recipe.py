"""Resolve a run's configs: model preset + YAML recipe + ``key=value`` overrides.

A recipe YAML file has up to three top-level keys, all optional::

    preset: mockingjay-small        # used when --model is not given
    model:  {hidden_dropout: 0.0}   # overrides on the preset's pretraining config
    train:  {steps: 20000, lr: 2.0e-4, max_batch_seconds: 64}

Command-line overrides are ``model.KEY=VALUE`` or ``train.KEY=VALUE`` (dotted keys reach
nested configs, e.g. ``model.frontend.n_mels=40``); a bare ``KEY=VALUE`` is accepted when
KEY names a field of exactly one of the two configs. Every key is checked before any work
starts: an unknown or out-of-range one raises :class:`~aviary.config.ConfigError` naming it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

from aviary.config import Config, ConfigError, apply_overrides
from aviary.models.registry import get_preset
from aviary.train.config import TrainConfig

_RECIPE_KEYS = ("preset", "model", "train")


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a recipe YAML file (safe loader: plain data only) and check its top-level keys."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a recipe must be a mapping with keys {list(_RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(_RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; allowed {list(_RECIPE_KEYS)}")
    for k in ("model", "train"):
        if data.get(k) is not None and not isinstance(data[k], Mapping):
            raise ConfigError(f"{path}: '{k}' must be a mapping of config keys")
    return dict(data)


def _field_names(cfg: Config) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}


def split_overrides(overrides: Iterable[str], model_cfg: Config, train_cfg: TrainConfig
                    ) -> tuple[list[str], list[str]]:
    """Route ``key=value`` strings to the model or the train config.

    Returns:
        (model overrides, train overrides), with the ``model.`` / ``train.`` prefix removed.
    """
    to_model, to_train = [], []
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key = ov.split("=", 1)[0].strip()
        if key.startswith("model."):
            to_model.append(ov.strip()[len("model."):])
        elif key.startswith("train."):
            to_train.append(ov.strip()[len("train."):])
        else:
            head = key.split(".", 1)[0]
            in_model, in_train = head in _field_names(model_cfg), head in _field_names(train_cfg)
            if in_model and in_train:
                raise ConfigError(f"override key '{key}' names a field of both the model and the "
                                  f"train config; write model.{key} or train.{key}")
            if not (in_model or in_train):
                raise ConfigError(
                    f"unknown config key '{key}'; train keys: {sorted(_field_names(train_cfg))}; "
                    f"model ({type(model_cfg).__name__}) keys: {sorted(_field_names(model_cfg))}")
            (to_model if in_model else to_train).append(ov.strip())
    return to_model, to_train


def resolve_configs(preset: str | None, recipe: str | os.PathLike | None = None,
                    overrides: Iterable[str] = (), steps: int | None = None,
                    base: tuple[Config, TrainConfig] | None = None) -> tuple[Config, TrainConfig]:
    """The model and train configs of a run, fully validated.

    Args:
        preset: model preset name (``None``: the recipe's ``preset``, or ``base``).
        recipe: optional recipe YAML file.
        overrides: ``key=value`` strings (applied last).
        steps: ``--steps``; overrides ``train.steps``.
        base: configs to start from instead of a preset (a resumed run's stored configs).

    Returns:
        (model pretraining config, :class:`TrainConfig`).
    """
    data = read_recipe(recipe) if recipe is not None else {}
    preset = preset or data.get("preset")
    if preset is not None:
        model_cfg, train_cfg = get_preset(preset), TrainConfig()
    elif base is not None:
        model_cfg, train_cfg = base
    else:
        raise ConfigError("no model given: pass --model PRESET (see `aviary models`) or a "
                          "recipe with a 'preset' key")
    if data.get("model"):
        model_cfg = apply_overrides(model_cfg, data["model"])
    if data.get("train"):
        train_cfg = apply_overrides(train_cfg, data["train"])
    to_model, to_train = split_overrides(list(overrides), model_cfg, train_cfg)
    if to_model:
        model_cfg = apply_overrides(model_cfg, to_model)
    if to_train:
        train_cfg = apply_overrides(train_cfg, to_train)
    if steps is not None:
        train_cfg = apply_overrides(train_cfg, [f"steps={steps}"])
    return model_cfg, train_cfg
