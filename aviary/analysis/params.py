"""Where the parameters of a pretraining model sit: front-end, input projection, layers, head.

Audio ALBERT's point (Chi et al. 2021) is that sharing one transformer layer across depth
cuts the parameters by the factor L (91.6 % fewer than a 12-layer Mockingjay at H=768) while
keeping most of the accuracy. The table here makes that visible for any model: per
component, the distinct parameters (shared tensors counted once), how many times the
component is applied, and the parameters it would have without sharing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch.nn as nn


def _distinct(params: Iterable[nn.Parameter], seen: set[int] | None = None) -> int:
    """Elements of distinct parameter tensors (by identity); updates ``seen`` if given."""
    seen = set() if seen is None else seen
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@dataclass(frozen=True)
class ParamRow:
    """One component of a parameter table.

    Attributes:
        component: ``front-end``, ``input projection``, ``transformer layers``,
            ``pretraining head`` or ``other``.
        params: distinct parameters (a shared layer counted once).
        applications: how many times the component's weights are used per forward
            (L for a shared layer stack, 1 otherwise).
        unshared_params: parameters the component would have without sharing.
        shared: whether weights are reused across applications.
    """

    component: str
    params: int
    applications: int
    unshared_params: int
    shared: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _find_encoder(model: nn.Module) -> nn.Module | None:
    """The Mockingjay-style encoder inside ``model`` (has ``input_proj`` and ``layers``), if any."""
    for m in model.modules():
        if hasattr(m, "input_proj") and hasattr(m, "layers") and hasattr(getattr(m, "layers"), "num_layers"):
            return m
    return None


def parameter_table(model: nn.Module) -> list[ParamRow]:
    """Parameter rows of a pretraining model (or of a bare upstream).

    Args:
        model: a pretraining model with an ``upstream`` attribute (its other sub-modules are
            the pretraining head), or an upstream. The encoder is located by its
            ``input_proj`` / ``layers`` attributes (:class:`~aviary.models.encoder.TransformerEncoder`).

    Returns:
        Rows in the order front-end, input projection, transformer layers, other (upstream
        parts not listed), pretraining head; rows with no parameters at all are kept for the
        front-end and layers only. The ``params`` column sums to the model's distinct total.
    """
    upstream = getattr(model, "upstream", model)
    encoder = _find_encoder(upstream)
    seen: set[int] = set()
    rows: list[ParamRow] = []

    frontend = getattr(upstream, "frontend", None)
    n = _distinct(frontend.parameters(), seen) if frontend is not None else 0
    rows.append(ParamRow("front-end", n, 1, n, False))
    if encoder is not None:
        proj = [encoder.input_proj.parameters()]
        if hasattr(encoder, "input_ln"):
            proj.append(encoder.input_ln.parameters())
        n = sum(_distinct(ps, seen) for ps in proj)
        rows.append(ParamRow("input projection", n, 1, n, False))
        stack = encoder.layers
        L = int(stack.num_layers)
        shared = bool(getattr(stack, "share_layers", False))
        n = _distinct(stack.parameters(), seen)
        # One layer's size times L: what the same depth costs without sharing.
        per_layer = _distinct(stack.layer(0).parameters()) if hasattr(stack, "layer") else n // max(L, 1)
        rows.append(ParamRow("transformer layers", n, L, per_layer * L, shared))
    n = _distinct(upstream.parameters(), seen)
    if n:
        rows.append(ParamRow("other", n, 1, n, False))
    if upstream is not model:
        n = _distinct(model.parameters(), seen)
        rows.append(ParamRow("pretraining head", n, 1, n, False))
    return rows


def parameter_summary(model: nn.Module) -> dict[str, Any]:
    """Totals of :func:`parameter_table`: ``upstream`` (encoder + input projection + front-end,
    the number papers report), ``head``, ``total``, ``unshared_upstream`` and the ``rows``."""
    rows = parameter_table(model)
    head = sum(r.params for r in rows if r.component == "pretraining head")
    upstream = sum(r.params for r in rows if r.component != "pretraining head")
    unshared = sum(r.unshared_params for r in rows if r.component != "pretraining head")
    return {"upstream": upstream, "head": head, "total": upstream + head,
            "unshared_upstream": unshared, "shared": any(r.shared for r in rows),
            "rows": [r.to_dict() for r in rows]}


def format_params(n: int) -> str:
    """``7150848 -> '7.15M'``, ``51200 -> '51.2k'``."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)
