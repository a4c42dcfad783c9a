"""Registry of model families and named presets: the one place every preset is found.

A *family* (``mam``, ``ssast``, ``vq-wav2vec``, ``token-bert``) knows how to turn its
pretraining config into a pretraining model and into an upstream. A *preset* is a named,
three-line factory returning a family's pretraining config (a frozen :class:`~aviary.config.Config`
with a ``family`` field). Tests loop over ``PRESETS`` so every preset is tested.

Discovery: a family module registers its :class:`Family` and presets when it is imported
(``register_family``, ``@register_preset``). The first lookup imports every module of the
packages in ``FAMILY_PACKAGES`` (``aviary/models/``), so a new family is one new module there
and no list elsewhere needs editing.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

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


FAMILY_PACKAGES = ("aviary.models",)
"""Packages whose modules are imported to find the families and presets (see the module docstring)."""

_loaded = False


def family_modules() -> list[str]:
    """Names of the modules :func:`_load_all` imports: every public module of ``FAMILY_PACKAGES``."""
    names = []
    for pkg_name in FAMILY_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                names.append(f"{pkg_name}.{info.name}")
    return sorted(names)


def _load_all() -> None:
    # Importing a family module registers its family and presets; done once per process.
    global _loaded
    if _loaded:
        return
    for mod in family_modules():
        importlib.import_module(mod)
    _loaded = True


def list_presets() -> list[str]:
    """Every preset, in a canonical order: by defining module (in :func:`family_modules`' order),
    then as each module registers them; presets registered elsewhere follow, as registered.
    Not plain registration order: that depends on which module a process happened to import first."""
    _load_all()
    rank = {m: i for i, m in enumerate(family_modules())}
    names = list(PRESETS)
    pos = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(getattr(PRESETS[n], "__module__", None), len(rank)), pos[n]))


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


def build_upstream_from_config(stored: Mapping[str, Any], source: Any = None) -> tuple[Config, nn.Module]:
    """The config and a freshly built (untrained) upstream for a config stored in a checkpoint.

    Args:
        stored: the checkpoint's config: ``{"model": <pretraining config>, ...}`` or the
            pretraining config itself.
        source: the file it was read from, named by errors.

    Returns:
        ``(pretraining config, upstream)``; weights are loaded by the caller.
    """
    cfg = config_from_dict(stored.get("model", stored), source=source)
    return cfg, get_family(cfg.family).build_upstream(cfg)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared tensors, as in ALBERT, are counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class _ShapesOnly(TorchFunctionMode):
    """Inside ``torch.device("meta")``: skip what computes values, keep what decides shapes.

    On the meta device torch runs initialisers (``normal_``, ``uniform_``) and elementwise
    arithmetic (``0.01 * randn(...)``) through Python reference kernels whose first call
    imports ``torch._dynamo`` (2-4 s here, more than the rest of ``aviary models``); their
    values mean nothing on meta tensors. So an in-place op (name ending in ``_``) on a meta
    tensor returns the tensor untouched (constructors use in-place ops to fill values, never
    to reshape), and the few elementwise operators below give an empty tensor of the
    broadcast shape and promoted dtype. Any other op runs as usual: only slower, never wrong.
    """

    _ELEMENTWISE = {"mul", "add", "sub", "div", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__",
                    "__rsub__", "__truediv__", "__rtruediv__", "__neg__", "neg"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.startswith("_") and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        if name in self._ELEMENTWISE and not kwargs:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and all(t.is_meta for t in tensors):
                dtype = torch.result_type(*args[:2]) if len(args) == 2 else tensors[0].dtype
                return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=dtype, device="meta")
        return func(*args, **kwargs)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules for their shapes alone: every tensor on the meta device, no initialisation.

    ``count_parameters`` of a model built inside equals that of the real model
    (``tests/models/test_parameter_counts.py`` checks every preset), at no memory and
    almost no time.
    """
    with torch.device("meta"), _ShapesOnly():
        yield


def describe_preset(name: str) -> dict[str, Any]:
    """Summary of preset ``name`` for listings (``aviary models``).

    The model is built :func:`shapes_only` (meta device, no memory, no initialisation), so
    listing even 85M-parameter presets is instant.

    Returns:
        ``{"family", "description", "params"}`` (upstream parameters, shared ones counted
        once; ``None`` when the preset needs data to be built, e.g. a token vocabulary,
        with the reason under ``"note"``), plus ``"pretrain_params"`` (with heads),
        ``"hidden_size"``, ``"num_hidden_states"`` and ``"frame_shift"`` when known.
    """
    cfg = get_preset(name)
    info: dict[str, Any] = {"family": cfg.family, "description": PRESET_INFO.get(name, "")}
    try:
        with shapes_only():
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
