"""Frozen, validated configuration dataclasses shared by every component.

Every component of aviary (front-end, encoder, objective, trainer, probe) is described by
one frozen dataclass deriving from :class:`Config`. A config:

* validates itself on construction (``validate``), so a bad value fails before any work,
  with the key's name, the value and the allowed range in the message;
* round-trips through plain JSON (``to_dict`` / ``from_dict``), which is what checkpoints
  store: nothing in a config is code, nothing is pickled;
* rejects unknown keys in ``from_dict`` (a typo such as ``lerning_rate`` is an error,
  not a silently ignored setting) and coerces ``"3"``-style strings from the command line
  to the field's declared type;
* accepts ``key=value`` overrides (``apply_overrides``), dotted for nested configs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range."""


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError naming ``key``, ``value`` and what is allowed unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: allowed {allowed}")


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Check ``lo <= value <= hi`` (open bounds when asked) and name the key on failure."""
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    check(ok, key, value, f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Check that ``value`` is one of ``choices`` and name the key on failure."""
    choices = list(choices)
    check(value in choices, key, value, f"one of {choices}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
               "on": True, "off": False}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` (from JSON/YAML/command line) to the declared field type ``tp``."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, _prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_tp = args[0]
            return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}' needs {len(args)} values, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        # Literal["a", "b"]: compare as strings so that command-line values match.
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: allowed one of {list(choices)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"config key '{key}' must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        f = None
        if isinstance(value, (int, float)):
            f = float(value)
        elif isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
        if f is None:
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(f):
            # inf / nan pass every range check written as "> 0" (nan fails them all, inf passes
            # "(0, inf]"): a learning rate of inf trains a NaN model, so no setting may be one.
            raise ConfigError(f"config key '{key}' = {value!r} is invalid: allowed a finite number")
        return f
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: frozen dataclass, validated on construction, JSON round-trip."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(f.name, value, hints[f.name])
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Check ranges and combinations; raise ConfigError. Override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested configs become dicts, tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, Config) else x for x in v]
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], _prefix: str = "") -> C:
        """Build from a mapping; unknown keys are an error naming the key and the known ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {[_prefix + u for u in unknown]} for {cls.__name__}; "
                f"known keys: {sorted(names)}")
        return cls(**{k: v for k, v in data.items()})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})


def apply_overrides(cfg: C, overrides: Iterable[str] | Mapping[str, Any]) -> C:
    """Apply ``key=value`` overrides (dotted keys reach nested configs).

    Args:
        cfg: the config to start from.
        overrides: strings ``"key=value"`` (command line) or a mapping (YAML).

    Returns:
        A new, validated config. Unknown keys raise ConfigError naming the key.
    """
    if isinstance(overrides, Mapping):
        items = list(_flatten(overrides))
    else:
        items = []
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} is not of the form key=value")
            k, v = ov.split("=", 1)
            items.append((k.strip(), v.strip()))
    data = cfg.to_dict()
    for key, value in items:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"unknown config key '{key}' for {type(cfg).__name__}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key '{key}' for {type(cfg).__name__}; "
                              f"known keys: {sorted(node)}")
        node[parts[-1]] = value
    return type(cfg).from_dict(data)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
