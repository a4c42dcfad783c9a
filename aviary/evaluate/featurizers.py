"""Featurizers: how a probe reads an upstream's L+1 hidden states.

Three ways, as in the AALBERT paper and s3prl (REFERENCE.md section 2):

* one layer ``k`` (0 = the embedding output, ``L`` = the last layer);
* the last layer (``"last"``, an alias of ``k = L`` that is recorded as such);
* the ELMo-style weighted sum ``sum_i softmax(w)_i * h_i`` with ``w`` initialised to zero
  (so training starts from the plain average) and, optionally, a parameter-free layer
  norm applied to every layer first so that layers of very different scale compete fairly.

Every featurizer takes the hidden states stacked as one tensor ``(..., N, H)`` where ``N``
is the number of layers it was built for, which lets frozen probes read all layers of a
batch from the feature cache in one slice.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

LayerSpec = Union[int, str]
"""An int ``k``, ``"last"`` or ``"weighted"``."""


def parse_layer_spec(spec: LayerSpec | str, num_hidden_states: int | None = None) -> LayerSpec:
    """Normalise a layer spec from the command line or the API.

    Args:
        spec: ``"last"``, ``"weighted"``, an int or a digit string (negative counts from the end).
        num_hidden_states: L + 1, to check the range and resolve negative indices.

    Returns:
        ``"last"``, ``"weighted"`` or a non-negative int.
    """
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("last", "weighted"):
            return s
        try:
            spec = int(s)
        except ValueError:
            raise ValueError(f"layer {spec!r} is not an integer, 'last' or 'weighted'") from None
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise ValueError(f"layer {spec!r} is not an integer, 'last' or 'weighted'")
    if num_hidden_states is not None:
        if not -num_hidden_states <= spec < num_hidden_states:
            raise ValueError(f"layer {spec} out of range for an upstream with {num_hidden_states} "
                             f"hidden states (0..{num_hidden_states - 1})")
        spec %= num_hidden_states
    elif spec < 0:
        raise ValueError(f"negative layer {spec} needs the number of hidden states")
    return spec


def layer_index(spec: LayerSpec, num_hidden_states: int) -> int | None:
    """The hidden-state index a spec reads (``None`` for the weighted sum)."""
    spec = parse_layer_spec(spec, num_hidden_states)
    if spec == "weighted":
        return None
    return num_hidden_states - 1 if spec == "last" else int(spec)


class LayerSelect(nn.Module):
    """Pick one hidden state: ``(..., N, H) -> (..., H)``.

    Args:
        index: which of the N stacked states to return.
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states: (..., N, H)
        if not 0 <= self.index < states.shape[-2]:
            raise ValueError(f"layer {self.index} out of range for stacked states of shape {tuple(states.shape)}")
        return states[..., self.index, :]  # (..., H)


class WeightedSum(nn.Module):
    """ELMo-style scalar mix: ``sum_i softmax(w)_i * LN?(h_i)``, ``w`` initialised to zero.

    Args:
        num_layers: N, the number of stacked hidden states (L + 1).
        layer_norm: apply a parameter-free layer norm (no gain, no bias) to each layer
            before mixing; s3prl's ``normalize`` option.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"WeightedSum needs at least one layer, got num_layers={num_layers}")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        # Zero init = uniform softmax: no layer is preferred before training (ELMo, s3prl).
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states: (..., N, H)
        if states.shape[-2] != self.num_layers:
            raise ValueError(f"WeightedSum built for {self.num_layers} layers got stacked states "
                             f"of shape {tuple(states.shape)}")
        if self.layer_norm:
            states = F.layer_norm(states, states.shape[-1:])
        w = torch.softmax(self.weights, dim=0).to(states.dtype)  # (N,)
        return torch.einsum("...nh,n->...h", states, w)  # (..., H)

    def mix_layer_major(self, states: torch.Tensor) -> torch.Tensor:
        """The same mix of layer-major states ``(N, ..., H) -> (..., H)`` (no layer norm): one
        matrix-vector product over contiguous memory, and another for its gradient."""
        if states.shape[0] != self.num_layers:
            raise ValueError(f"WeightedSum built for {self.num_layers} layers got layer-major states "
                             f"of shape {tuple(states.shape)}")
        w = torch.softmax(self.weights, dim=0).to(states.dtype)  # (N,)
        return torch.tensordot(w, states, dims=1)

    def normalized_weights(self) -> list[float]:
        """The softmax-normalised layer weights (what results records report)."""
        return [float(x) for x in torch.softmax(self.weights.detach().float(), dim=0)]


def build_featurizer(spec: LayerSpec, num_hidden_states: int, layer_norm: bool = False,
                     stacked_indices: list[int] | None = None) -> nn.Module:
    """Build the featurizer for a layer spec.

    Args:
        spec: int ``k``, ``"last"`` or ``"weighted"``.
        num_hidden_states: L + 1 of the upstream.
        layer_norm: parameter-free layer norm per layer (weighted sum only).
        stacked_indices: which hidden states the stacked input holds (default: all L + 1,
            in order). A single-layer featurizer over a one-layer stack selects index 0.

    Returns:
        An ``nn.Module`` mapping ``(..., N, H) -> (..., H)``.
    """
    stacked = list(range(num_hidden_states)) if stacked_indices is None else list(stacked_indices)
    spec = parse_layer_spec(spec, num_hidden_states)
    if spec == "weighted":
        if stacked != list(range(num_hidden_states)):
            raise ValueError(f"the weighted sum needs all {num_hidden_states} hidden states, got {stacked}")
        return WeightedSum(num_hidden_states, layer_norm=layer_norm)
    k = layer_index(spec, num_hidden_states)
    if k not in stacked:
        raise ValueError(f"layer {k} is not among the stacked hidden states {stacked}")
    return LayerSelect(stacked.index(k))
