"""Registry of model families and named presets.

A *family* (``mam``, ``ssast``, ``vq-wav2vec``, ``token-bert``) knows how to turn its
pretraining config into a pretraining model and into an upstream. A *preset* is a named,
three-line factory returning a family's pretraining config (a frozen :class:`~aviary.config.Config`
with a ``family`` field). Tests loop over ``PRESETS`` so every preset is tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from aviary.config import Config, ConfigError
from aviary.objectives.base import Objective, PretrainModel


@dataclass(frozen=True)
class Family:
    """How to build the models of one family from its config.

    Attributes:
        name: family id stored in checkpoints (``config["family"]``).
        config_cls: the family's pretraining config class (has a ``family`` field).
        build_upstream: config -> bare upstream (weights loaded afterwards from the pretraining
            model's state dict, whose keys start with ``upstream.``).
        build_objective: (config, upstream) -> the :class:`~aviary.objectives.base.Objective`
            the family pretrains with (its heads sized from the upstream); the config may name
            one of several (e.g. a masked acoustic model's ``objective`` field).
        batch_kind: ``"audio"`` (batches of waveforms) or ``"tokens"`` (token-id sequences).
        fit_corpus_stats: optional ``(config, batches of (wavs, lengths)) -> config`` that
            measures corpus statistics the model normalises with (SSAST's fbank mean / std)
            and returns the config holding them; the loop calls it once before training.
        build_pretrain_upstream: optional config -> upstream for pretraining, when it differs
            from the one ``build_upstream`` rebuilds for loading (token-BERT copies its token
            corpus's tokenizer and vocabulary in); ``None``: ``build_upstream``.
    """

    name: str
    config_cls: type
    build_upstream: Callable[[Any], nn.Module]
    build_objective: Callable[[Any, nn.Module], Objective]
    batch_kind: str = "audio"
    fit_corpus_stats: Callable[[Any, Any], Any] | None = None
    build_pretrain_upstream: Callable[[Any], nn.Module] | None = None

    def build_pretrain(self, cfg: Any) -> PretrainModel:
        """The pretraining model of ``cfg``: ``PretrainModel(upstream, objective)``, the same
        class for every family (``forward(batch, generator=None) -> ObjectiveOutput``)."""
        upstream = (self.build_pretrain_upstream or self.build_upstream)(cfg)
        return PretrainModel(upstream, self.build_objective(cfg, upstream), config=cfg)


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, Callable[[], Config]] = {}
PRESET_INFO: dict[str, str] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def register_preset(name: str, description: str = "") -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    """Decorator registering a preset factory under ``name``."""

    def deco(fn: Callable[[], Config]) -> Callable[[], Config]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = fn
        PRESET_INFO[name] = description or (fn.__doc__ or "").strip().split("\n")[0]
        return fn

    return deco


def _load_all() -> None:
    # Importing the model modules registers their families and presets.
    import importlib

    for mod in ("aviary.models.presets",):
        importlib.import_module(mod)


def list_presets() -> list[str]:
    _load_all()
    return list(PRESETS)


def get_preset(name: str) -> Config:
    """The pretraining config of preset ``name`` (unknown names list the known ones)."""
    _load_all()
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


def get_family(name: str) -> Family:
    _load_all()
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_pretrain(cfg: Config) -> PretrainModel:
    """The pretraining model of a family config (its upstream composed with its objective)."""
    return get_family(cfg.family).build_pretrain(cfg)


def config_from_dict(d: Mapping[str, Any], source: Any = None) -> Config:
    """Rebuild a pretraining config from its JSON dict (dispatching on ``family``).

    Args:
        d: the dict.
        source: the file it was read from; a bad config's error then names it.
    """
    if source is not None:
        try:
            return config_from_dict(d)
        except (ConfigError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{source}: the model config stored in the file is invalid: {e}") from None
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
    fam = d.get("family")
    if fam is None:
        raise ConfigError(f"config has no 'family' key (keys: {sorted(d)})")
    return get_family(fam).config_cls.from_dict(d)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors, as in ALBERT, are counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def describe_preset(name: str) -> dict[str, Any]:
    """Summary of preset ``name`` for listings (``aviary models``).

    The model is built on the meta device (shapes only, no memory, no initialisation), so
    listing even 85M-parameter presets is instant.

    Returns:
        ``{"family", "description", "params"}`` (upstream parameters, shared ones counted
        once; ``None`` when the preset needs data to be built, e.g. a token vocabulary,
        with the reason under ``"note"``), plus ``"pretrain_params"`` (with heads),
        ``"hidden_size"``, ``"num_hidden_states"`` and ``"frame_shift"`` when known.
    """
    import torch

    cfg = get_preset(name)
    info: dict[str, Any] = {"family": cfg.family, "description": PRESET_INFO.get(name, "")}
    try:
        with torch.device("meta"):
            model = get_family(cfg.family).build_pretrain(cfg)
    except ConfigError as e:
        info.update(params=None, note=str(e))
        return info
    up = model.upstream
    info.update(params=count_parameters(up), pretrain_params=count_parameters(model),
                hidden_size=getattr(up, "hidden_size", None),
                num_hidden_states=getattr(up, "num_hidden_states", None),
                frame_shift=getattr(up, "frame_shift", None))
    return info
