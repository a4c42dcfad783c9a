"""Opt-in ``torch.compile`` (inductor) of a model's transformer layers, with an eager fallback.

``aviary pretrain --compile``, ``aviary extract --compile`` and ``aviary probe --finetune
--compile`` call :func:`compile_model` once on the built model. What gets compiled are the
repeated blocks where element-wise work dominates at the CPU presets' shapes (H = 256,
~133 frames at R = 3: LayerNorm, GELU, dropout, residual adds, the attention's reshapes):
every :class:`~aviary.models.layers.TransformerLayer` and the pretraining heads. The
front-ends (STFT, logs), masking and the loss stay eager: they hold data-dependent control
flow and cost little.

Each block is compiled *in place*: its class is swapped for a subclass whose ``forward`` is
the compiled one; the module tree, the parameters and ``state_dict()`` keys stay the same (no
``_orig_mod.`` prefix, unlike ``torch.compile(model)``), so checkpoints, ``--resume`` and
``aviary.load`` are unaffected, and a ``copy.deepcopy`` stays compiled and runs its own
weights. A shared layer (Audio ALBERT) is compiled once.

Compilation happens lazily, at a block's first call. If it fails (no C++ compiler, an
operator inductor cannot lower, ...), the block logs one warning naming the block and the
error and every block of that class runs eagerly from then on; the result of that call is
the eager one. Numerics:
compiled fp32 matches eager to float rounding (fused kernels reorder sums); dropout masks
come from inductor's own generator, so a compiled run is reproducible for a seed but not
bitwise equal to an eager one (``tests/train/test_compile.py``).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Any, Callable

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# Class names of the blocks compiled by default (matched by name so that this module imports
# no model code; any family whose layers are these classes gets them compiled).
DEFAULT_BLOCKS = ("TransformerLayer", "SpecHead")


class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here (the message says why)."""


def compiler_problem() -> str | None:
    """Why inductor cannot compile for the CPU here, or ``None`` when it can (a C++ compiler)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return None
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler found (inductor needs g++ or clang++ on PATH, or $CXX)"


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception, and of its root cause (dynamo wraps the backend's)."""
    def one(x: BaseException) -> str:
        text = str(x).strip()
        return f"{type(x).__name__}: {text.splitlines()[0][:300] if text else ''}"

    root = e
    for _ in range(8):
        inner = getattr(root, "inner_exception", None) or root.__cause__ or root.__context__
        if inner is None or inner is root:
            break
        root = inner
    return one(e) if root is e else f"{one(e)} <- {one(root)}"


_COMPILED_CLASSES: dict[tuple[Any, ...], type] = {}


def _compiled_class(cls: type, backend: Any, dynamic: bool | None, mode: str | None) -> type:
    """A subclass of ``cls`` whose ``forward`` is compiled, falling back to ``cls.forward``.

    The subclass (not a closure on the instance) carries the compiled function, so a
    ``copy.deepcopy`` of a compiled module (fine-tuning probes copy the upstream) runs the
    copy's own weights, and ``module.__class__ = cls`` undoes the compilation.
    """
    key = (cls, backend, dynamic, mode)
    if key in _COMPILED_CLASSES:
        return _COMPILED_CLASSES[key]
    eager = cls.forward
    compiled = torch.compile(eager, backend=backend, dynamic=dynamic, mode=mode)
    failed: list[str] = []

    @functools.wraps(eager)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not failed:
            try:
                return compiled(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                failed.append(_describe(e))
                log.warning("--compile: compiling %s.forward failed (%s); running it eagerly from now on",
                            cls.__name__, failed[0])
        self.__class__ = cls
        return eager(self, *args, **kwargs)

    sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "_aviary_compiled": True,
                                      "_aviary_eager_class": cls})
    _COMPILED_CLASSES[key] = sub
    return sub


def compile_model(model: nn.Module, enabled: bool = True, blocks: tuple[str, ...] = DEFAULT_BLOCKS,
                  backend: str | Callable[..., Any] = "inductor", dynamic: bool | None = None,
                  mode: str | None = None) -> list[str]:
    """Compile ``model``'s blocks in place (see the module docstring).

    Args:
        model: any module; it is modified in place and keeps its ``state_dict`` keys.
        enabled: ``False`` does nothing (so callers can pass their ``--compile`` flag).
        blocks: class names of the sub-modules to compile.
        backend: ``torch.compile`` backend (tests pass a failing one to check the fallback).
        dynamic: passed to ``torch.compile`` (``None``: a dimension becomes dynamic after
            the first recompilation for a new size).
        mode: passed to ``torch.compile``.

    Returns:
        The qualified names of the compiled blocks (empty when disabled or when compilation
        is unavailable: then a warning says why and everything runs eagerly).
    """
    if not enabled:
        return []
    if backend == "inductor":
        problem = compiler_problem()
        if problem:
            log.warning("--compile: %s; running eagerly", problem)
            return []
    done: list[str] = []
    for name, m in model.named_modules():
        if type(m).__name__ not in blocks or getattr(m, "_aviary_compiled", False):
            continue
        m.__class__ = _compiled_class(type(m), backend, dynamic, mode)
        done.append(name)
    log.info("--compile: %d block(s) compiled with %s at their first call (%s)", len(done),
             backend if isinstance(backend, str) else getattr(backend, "__name__", "a custom backend"),
             ", ".join(done[:4]) + (", ..." if len(done) > 4 else ""))
    return done


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_model`: every block runs its class's eager ``forward`` again."""
    for m in model.modules():
        eager = getattr(type(m), "_aviary_eager_class", None)
        if eager is not None:
            m.__class__ = eager


def is_compiled(module: nn.Module) -> bool:
    """Whether any block of ``module`` currently runs compiled."""
    return any(getattr(type(m), "_aviary_compiled", False) for m in module.modules())
