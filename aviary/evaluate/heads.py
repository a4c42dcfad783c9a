"""Probing heads: ``linear``, ``mlp1`` (one hidden layer) and ``mlp2`` (two hidden layers).

The AALBERT / Mockingjay papers probe with a linear classifier and with one- and
two-hidden-layer MLPs (s3prl uses width 768). aviary defaults to width 256
(:data:`DEFAULT_HIDDEN`): on a 2-core CPU the 768-wide two-hidden-layer probe costs ~6x
the compute per frame, and on the toy corpora the narrower probe reaches the same accuracy
within noise. ``--hidden 768`` gives the s3prl setting.

Heads see one vector per example: a frame for frame-level tasks, a mean-pooled
utterance for utterance-level tasks (pooling lives in :mod:`aviary.evaluate.probe`).
"""
from __future__ import annotations

import torch.nn as nn

HEADS = ("linear", "mlp1", "mlp2")
DEFAULT_HIDDEN = 256


def build_head(kind: str, in_dim: int, num_classes: int, hidden: int = DEFAULT_HIDDEN,
               dropout: float = 0.0) -> nn.Module:
    """A classifier ``(..., in_dim) -> (..., num_classes)`` logits.

    Args:
        kind: ``"linear"``, ``"mlp1"`` or ``"mlp2"``.
        in_dim: feature size H of the upstream.
        num_classes: output classes.
        hidden: width of the hidden layers of the MLPs.
        dropout: dropout after each hidden ReLU (0 = none).

    Returns:
        The head module.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {list(HEADS)}")
    if in_dim < 1 or num_classes < 2 or hidden < 1:
        raise ValueError(f"head needs in_dim >= 1, num_classes >= 2, hidden >= 1; got "
                         f"in_dim={in_dim}, num_classes={num_classes}, hidden={hidden}")
    if kind == "linear":
        return nn.Linear(in_dim, num_classes)
    depth = 1 if kind == "mlp1" else 2
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)
