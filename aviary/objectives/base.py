"""What every objective returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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
