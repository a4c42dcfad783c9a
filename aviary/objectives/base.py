"""What every objective is and returns, and the one pretraining model that composes them.

An *objective* is an ``nn.Module`` that owns what only pretraining needs (its heads, its
masking, its target quantiser) and takes the upstream as an argument::

    out = objective(upstream, batch, generator)   # -> ObjectiveOutput(loss, metrics, extras)

The upstream is never a sub-module of the objective, so a pretraining checkpoint holds the
encoder once (under ``upstream.``) and ``aviary.load`` finds it there. Objectives know the
upstream only through the attributes they use (a ``typing.Protocol`` per objective, e.g.
:class:`aviary.objectives.mspm.PatchEncoder`); nothing in ``objectives/`` imports ``models/``.

Masks and every other random draw come from the ``batch`` (a key such as ``"mask"``, to pin
them in tests and analysis) or from the ``generator`` argument (``None``: the global torch
RNG, which the training loop seeds and checkpoints; that is what makes resume bitwise).

:class:`PretrainModel` is the only pretraining model: ``PretrainModel(upstream, objective)``.
A model family says which objective it trains with (``Family.build_objective`` in
:mod:`aviary.models.registry`). A family config may also leave the choice to its presets
with a field typed :class:`ObjectiveConfig` (the masked acoustic models' ``objective``):
each objective module defines an ``ObjectiveConfig`` subclass with a unique ``name``, which
registers itself and is found by that name when a checkpoint's config is read (every module
of this package is imported on demand), so a new objective is one new file here plus its
presets. See DEVELOPING.md, "Adding an objective".
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from aviary.config import Config, ConfigError, check


@dataclass
class ObjectiveOutput:
    """Result of one objective / pretraining-model forward pass.

    Attributes:
        loss: scalar tensor to minimise.
        metrics: name -> scalar (float or 0-d tensor) for logging, e.g. ``{"l1": ..., "masked_frac": ...}``.
        extras: optional tensors for analysis (predictions, masks); never used by the loop.
    """

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """Base of the configs of objectives that presets choose by name.

    Subclasses set a default for ``name`` (unique; it is the key in a checkpoint's config) and
    implement :meth:`build`. ``from_dict`` on this base dispatches on ``name``.

    Attributes:
        name: the objective's registered name, e.g. ``"bestrq"``.
    """

    name: str = ""
    registry: ClassVar[dict[str, type["ObjectiveConfig"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__} must set a default for `name` (its registered name)")
        if name in ObjectiveConfig.registry and ObjectiveConfig.registry[name].__qualname__ != cls.__qualname__:
            raise TypeError(f"objective name {name!r} is taken by {ObjectiveConfig.registry[name].__name__}")
        ObjectiveConfig.registry[name] = cls

    def __post_init__(self) -> None:
        check(type(self) is not ObjectiveConfig, "name", self.name,
              f"a registered objective: {sorted(ObjectiveConfig.registry)}")
        default = type(self).__dict__.get("name")
        check(self.name == default, "name", self.name, f"{default!r} for {type(self).__name__}")
        super().__post_init__()  # coercion, then the subclass's validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], _prefix: str = "") -> "ObjectiveConfig":
        if cls is not ObjectiveConfig:
            return super().from_dict(data, _prefix)
        if not isinstance(data, Mapping) or "name" not in data:
            raise ConfigError(f"config key '{_prefix}name' missing: an objective config names its objective "
                              f"(known: {sorted(ObjectiveConfig.registry)})")
        name = data["name"]
        if name not in ObjectiveConfig.registry:
            _import_objectives()
        if name not in ObjectiveConfig.registry:
            raise ConfigError(f"config key '{_prefix}name' = {name!r}: unknown objective; known: "
                              f"{sorted(ObjectiveConfig.registry)}")
        return ObjectiveConfig.registry[name].from_dict(data, _prefix)

    def build(self, upstream: nn.Module) -> "Objective":
        """The objective for ``upstream`` (heads sized from its ``hidden_size``, its front-end)."""
        raise NotImplementedError


def _import_objectives() -> None:
    """Import every module of this package, so each ObjectiveConfig subclass registers."""
    import aviary.objectives as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


class Objective(nn.Module):
    """Base class of pretraining objectives.

    Subclasses implement :meth:`forward`; they may override :meth:`set_progress` (schedules
    that depend on training progress, e.g. a Gumbel temperature) and :meth:`no_weight_decay`.

    Attributes:
        state_prefix: where the objective's parameters and buffers sit in a checkpoint.
            ``"objective."`` (the default) for every new objective; ``""`` for the objectives
            whose tensors were top-level keys before objectives were modules (``head.*`` of
            the masked acoustic models and token-BERT, ``predictor.*`` / ``logit_bias`` of
            vq-wav2vec), so checkpoints written then still load and resume.
    """

    state_prefix: ClassVar[str] = "objective."

    def forward(self, upstream: nn.Module, batch: dict[str, Any],
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One pretraining step's loss.

        Args:
            upstream: the model being pretrained (its encoder and front-end).
            batch: the collate's dict (``wavs`` / ``wav_lengths`` or ``tokens`` / ``lengths``),
                optionally ``mask`` to pin the masked positions.
            generator: seeds every random draw of the step (``None``: global RNG).

        Returns:
            :class:`ObjectiveOutput`.
        """
        raise NotImplementedError

    def set_progress(self, upstream: nn.Module, step: int, total_steps: int) -> None:
        """Called by the training loop before each step; nothing to do by default."""

    def no_weight_decay(self) -> list[str]:
        """Names (relative to the objective) of parameters AdamW must not decay."""
        return []


class PretrainModel(nn.Module):
    """An upstream and the objective it is pretrained with: ``forward(batch) -> ObjectiveOutput``.

    Args:
        upstream: the :class:`~aviary.models.upstream.Upstream` (what ``aviary.load`` returns).
        objective: an :class:`Objective`.
        config: the pretraining config both were built from (kept as ``model.config``).

    The state dict holds ``upstream.*`` and the objective's tensors under its
    ``state_prefix``; loading accepts that layout (and, for a prefix other than
    ``"objective."``, the ``objective.*`` one too).
    """

    def __init__(self, upstream: nn.Module, objective: Objective, config: Any = None) -> None:
        super().__init__()
        self.upstream = upstream
        self.objective = objective
        self.config = config
        self.register_state_dict_post_hook(_save_objective_keys)
        self.register_load_state_dict_pre_hook(_load_objective_keys)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One pretraining step on ``batch``; random draws from ``generator`` (``None``: global RNG)."""
        return self.objective(self.upstream, batch, generator)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Let the objective follow training progress (see :meth:`Objective.set_progress`)."""
        self.objective.set_progress(self.upstream, step, total_steps)

    def no_weight_decay(self) -> list[str]:
        names = [f"upstream.{n}" for n in getattr(self.upstream, "no_weight_decay", lambda: [])()]
        return names + [f"objective.{n}" for n in self.objective.no_weight_decay()]


def _save_objective_keys(module: PretrainModel, state_dict: dict[str, Any], prefix: str,
                         local_metadata: Any) -> None:
    """State-dict hook: ``objective.X`` -> ``<state_prefix>X``, order kept."""
    new = module.objective.state_prefix
    old = prefix + "objective."
    if new == "objective.":
        return
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        state_dict[prefix + new + k[len(old):] if k.startswith(old) else k] = v


def _load_objective_keys(module: PretrainModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: the inverse of :func:`_save_objective_keys` (keys outside ``upstream.``
    belong to the objective)."""
    new = module.objective.state_prefix
    if new == "objective.":
        return
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if rest.startswith(("upstream.", "objective.")) or not rest.startswith(new):
            continue
        state_dict[prefix + "objective." + rest[len(new):]] = state_dict.pop(k)
