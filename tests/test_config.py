"""The Config base: coercion, validation, JSON round trip, unknown keys, overrides."""
import dataclasses
from typing import Literal, Optional

import pytest

from aviary.config import Config, ConfigError, apply_overrides, check_range


@dataclasses.dataclass(frozen=True)
class Inner(Config):
    n: int = 3
    kind: Literal["a", "b"] = "a"

    def validate(self):
        check_range("n", self.n, 1, 10)


@dataclasses.dataclass(frozen=True)
class Outer(Config):
    x: float = 1.0
    flag: bool = False
    name: Optional[str] = None
    dims: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()


def test_round_trip_and_frozen():
    o = Outer(x=2, dims=[3, 4], inner={"n": 5, "kind": "b"})
    assert o.x == 2.0 and isinstance(o.x, float) and o.dims == (3, 4) and o.inner == Inner(5, "b")
    assert Outer.from_dict(o.to_dict()) == o
    assert Outer.from_dict(__import__("json").loads(o.to_json())) == o
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.x = 3.0


def test_command_line_strings_are_coerced():
    o = apply_overrides(Outer(), ["x=0.5", "flag=yes", "name=none", "dims=5,6", "inner.n=7", "inner.kind=b"])
    assert (o.x, o.flag, o.name, o.dims, o.inner.n, o.inner.kind) == (0.5, True, None, (5, 6), 7, "b")
    assert apply_overrides(Outer(), {"inner": {"n": 2}}).inner.n == 2


@pytest.mark.parametrize("data,msg", [
    ({"x": "abc"}, "'x' must be a number"),
    ({"flag": "maybe"}, "'flag' must be a boolean"),
    ({"inner": {"n": 2.5}}, "'n' must be an integer"),
    ({"inner": {"n": 11}}, r"'n' = 11 is invalid: allowed \[1, 10\]"),
    ({"inner": {"kind": "c"}}, r"'kind' = 'c' is invalid: allowed one of \['a', 'b'\]"),
    ({"inner": {"m": 1}}, r"unknown config key\(s\) \['inner.m'\]"),
    ({"y": 1}, r"unknown config key\(s\) \['y'\]"),
    ({"x": True}, "'x' must be a number"),
])
def test_errors_name_the_key(data, msg):
    with pytest.raises(ConfigError, match=msg):
        Outer.from_dict(data)


def test_override_errors():
    with pytest.raises(ConfigError, match="unknown config key 'inner.q'"):
        apply_overrides(Outer(), ["inner.q=1"])
    with pytest.raises(ConfigError, match="unknown config key 'x.y'"):
        apply_overrides(Outer(), ["x.y=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Outer(), ["x"])


def test_replace_validates():
    assert Inner().replace(n=4).n == 4
    with pytest.raises(ConfigError):
        Inner().replace(n=0)
