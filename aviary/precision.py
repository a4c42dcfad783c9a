"""One precision setting for every command: which dtype the matrix products run in.

``precision`` takes the same names everywhere (``aviary pretrain``, ``extract``, ``probe``,
``analyze``, ``demo``): ``auto`` (the default), ``fp32``, ``bf16``, ``fp16``. ``auto`` picks
bf16 only where it is native: CUDA with bf16 support, or a CPU with AMX-BF16 or AVX512-BF16.
Elsewhere bf16 is emulated and slow: on an AVX2 EPYC a 1024 x 1024 bf16 matmul ran at
0.65 GFLOP/s against 48.7 for fp32 (75x slower), so ``auto`` is fp32 there. fp16 needs loss
scaling to train and has no fast CPU kernels, so it is refused on a CPU.

The resolved choice (``"fp32"``, ``"bf16"`` or ``"fp16"``) is what gets logged and written
into records (probe results, cache index, ``run.json``, the demo summary), next to the
requested one.

This module sits at the bottom of the package: it imports nothing from models, train or
evaluate.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from aviary.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The old `--autocast` / `autocast` values of extract, probe and analyze (before issue 14).
LEGACY_AUTOCAST = {"none": "fp32", "bf16": "bf16"}


@functools.lru_cache(maxsize=4)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags listed in ``path`` (empty where it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) below its bf16 kernels.
_ONEDNN_NO_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


def kernels_allow_bf16() -> bool:
    """Whether torch's CPU kernels may use the CPU's bf16 instructions in this process.

    False when torch was held to AVX2 or below (``ATEN_CPU_CAPABILITY=avx2``) or oneDNN's ISA
    was capped below AVX512-BF16 (``ONEDNN_MAX_CPU_ISA=AVX2``): then bf16 runs emulated even on
    an AMX CPU (measured on the AMX Xeon with both set: a 1024 x 1024 bf16 matmul at 0.5 GFLOP/s
    against 58 for fp32, what issue 14's AVX2 EPYC gave).
    """
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX", "AVX2"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return isa.strip().upper() not in _ONEDNN_NO_BF16


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16) that
    torch's kernels may use here (:func:`kernels_allow_bf16`)."""
    flags = cpu_flags()
    return ("amx_bf16" in flags or "avx512_bf16" in flags) and kernels_allow_bf16()


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:  # once per process, not once per batch
    log.warning("precision bf16 on a CPU without AMX-BF16 / AVX512-BF16: bf16 is emulated there "
                "and much slower than fp32 (precision=auto picks fp32)")


def resolve_precision(precision: str, device: torch.device | str, *, loss_scaling: bool = False) -> str:
    """The precision to run in: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: where the computation runs.
        loss_scaling: the caller trains with a GradScaler (pretraining). Only then may
            ``auto`` pick fp16 (CUDA without bf16); otherwise it falls back to fp32 there.

    Returns:
        The resolved name.

    Raises:
        ConfigError: an unknown name, or fp16 on a CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"config key 'precision' = {precision!r} is invalid: allowed {', '.join(PRECISIONS)}")
    kind = _device_type(device)
    if kind == "cpu":
        if precision == "fp16":
            raise ConfigError("config key 'precision' = 'fp16' is invalid on CPU: allowed auto, fp32, bf16 "
                              "(fp16 has no fast CPU kernels and needs loss scaling)")
        if precision == "auto":
            return "bf16" if cpu_supports_bf16() else "fp32"
        if precision == "bf16" and not cpu_supports_bf16():
            _warn_emulated_bf16()
        return precision
    if precision == "auto":
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if kind == "cuda" and loss_scaling else "fp32"
    return precision


def autocast_dtype(resolved: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None``: fp32, no autocast)."""
    return _DTYPES[resolved]


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` (any of :data:`PRECISIONS`) on ``device``.

    fp32 is a null context; bf16 / fp16 are ``torch.autocast`` with that dtype. Resolve once
    per run with :func:`resolve_precision` and pass the result here per batch: ``auto``
    works too, but reads the (cached) CPU flags each time.
    """
    dtype = autocast_dtype(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device_type(device), dtype=dtype)


def precision_record(precision: str, device: torch.device | str, **kw: bool) -> dict[str, str]:
    """``{"precision": resolved, "precision_requested": precision}``, as written into records."""
    return {"precision": resolve_precision(precision, device, **kw), "precision_requested": precision}


def from_legacy_autocast(value: str) -> str:
    """An old ``autocast`` value (``"none"`` / ``"bf16"``) as a precision name."""
    if value not in LEGACY_AUTOCAST:
        raise ConfigError(f"config key 'autocast' = {value!r} is invalid: allowed none, bf16 "
                          f"(deprecated: use precision = {', '.join(PRECISIONS)})")
    return LEGACY_AUTOCAST[value]
