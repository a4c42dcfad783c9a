"""Saved expectations: results written once by an implementation, compared after a change.

A file in ``tests/data_files/*.expected.*`` records the machine that wrote it; there the new
result must be equal bit for bit, elsewhere (another CPU's kernels) close.
"""
from __future__ import annotations

import math
import platform
from typing import Any

import torch


def machine() -> str:
    """The torch version and CPU an expectation was written with."""
    return f"torch {torch.__version__} on {platform.machine()} {platform.processor()}".strip()


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """JSON-like values equal but for float rounding (NaN equals NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    return a == b
