"""Saved expectations: results written once by an implementation, compared after a change.

A file in ``tests/data_files/*.expected.*`` records the machine that wrote it; there the new
result must be equal bit for bit, elsewhere (another CPU's kernels) close.
"""
from __future__ import annotations

import math
import platform
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> str:
    """The torch version, CPU model and torch's CPU kernels an expectation was written with.

    ``platform.processor()`` is empty on Linux: until the CPU model was part of this, an AMD
    EPYC (AVX-512) read as the Intel Xeon that wrote the files and was held to bitwise equality.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__} on {platform.machine()} {_cpu_model()} ({cap})".strip()


def close(a: Any, b: Any, tol: float = 1e-6, key_tol: dict[str, float] | None = None) -> bool:
    """JSON-like values equal but for float rounding (NaN equals NaN); ``key_tol``: another
    tolerance for the values under the named dict keys (at any depth)."""
    return not differences(a, b, tol, key_tol=key_tol)


def differences(a: Any, b: Any, tol: float = 1e-6, path: str = "",
                key_tol: dict[str, float] | None = None) -> list[str]:
    """Where ``a`` and ``b`` differ beyond ``tol`` (``path: a != b`` lines; empty: :func:`close`)."""
    key_tol = key_tol or {}
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in differences(a[k], b[k], key_tol.get(k, tol), f"{path}.{k}", key_tol)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, tol, f"{path}[{i}]", key_tol)]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
