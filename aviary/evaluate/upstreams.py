"""Upstreams for evaluation: pretrained runs and the baselines, resolved from one string.

``aviary extract --checkpoint SPEC`` and ``aviary probe --upstream SPEC`` accept:

* a run directory or weights file: :func:`aviary.load`;
* ``fbank``, ``logmel``, ``logmel+delta``: the front-end features themselves, wrapped as an
  upstream with one hidden state (the "mel baseline" of the Mockingjay / AALBERT tables);
* ``random:PRESET``: the preset's encoder with random initialisation under a fixed seed
  (the "is it the pretraining or just the architecture?" baseline).

:func:`describe_upstream` gives the name, parameter count and a fingerprint of the weights
that the feature cache stores so a stale cache is detected.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from aviary import hub
from aviary.features import FrontEndConfig, build_frontend
from aviary.models.registry import count_parameters, get_family, get_preset
from aviary.models.upstream import Upstream
from aviary.storage import tensors_checksum

log = logging.getLogger(__name__)

FEATURE_BASELINES = ("fbank", "logmel", "logmel+delta")
RANDOM_PREFIX = "random:"


class FeatureUpstream(Upstream):
    """A front-end as an upstream with a single hidden state (its features).

    Args:
        frontend: a module from :func:`aviary.features.build_frontend` with
            ``forward(wavs, lengths) -> (feats (B, T, D), lengths)``, ``dim``, ``frame_shift``.
        name: the baseline's name as recorded in results.
    """

    def __init__(self, frontend: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.frontend = frontend
        self.name = name
        self.hidden_size = int(frontend.dim)
        self.frame_shift = float(frontend.frame_shift)
        self.sample_rate = int(getattr(frontend, "sample_rate", 16000))
        self.num_hidden_states = 1

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        # Always fp32, as inside the pretrained models: under precision=auto (bf16 autocast)
        # the baselines' mel matmul and logs would otherwise lose precision.
        with torch.autocast(device_type=wavs.device.type, enabled=False):
            feats, lengths = self.frontend(wavs.float(), wav_lengths)  # (B, T, D), (B,)
        return [feats], lengths


def _frontend_config(name: str) -> Any:
    # fbank: SSAST's 128-bin Kaldi-style input with its (x - mean) / (2 std) normalisation.
    # logmel: the 80-bin s3prl features with per-utterance CMVN, the "mel" baseline of the
    # Mockingjay / AALBERT tables (CMVN as in AALBERT's input).
    if name == "fbank":
        return FrontEndConfig(kind="fbank", n_mels=128)
    if name == "logmel":
        return FrontEndConfig(kind="logmel", delta_order=0, cmvn="utterance")
    if name == "logmel+delta":
        return FrontEndConfig(kind="logmel", delta_order=1, cmvn="utterance")
    raise ValueError(f"unknown feature baseline {name!r}; known: {list(FEATURE_BASELINES)}")


def build_feature_upstream(name: str) -> FeatureUpstream:
    """The ``fbank`` / ``logmel`` / ``logmel+delta`` baseline upstream."""
    return FeatureUpstream(build_frontend(_frontend_config(name)), name).eval()


def build_random_upstream(preset: str, seed: int = 0) -> Upstream:
    """The upstream of ``preset`` with random initialisation drawn under ``seed``."""
    cfg = get_preset(preset)
    # Seed a private generator state: the random baseline must be the same network in
    # every run (and every cache) without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        upstream = get_family(cfg.family).build_upstream(cfg)
    upstream.random_init_seed = seed
    return upstream.eval()


def resolve_upstream(spec: str, device: str | torch.device = "cpu", seed: int = 0) -> tuple[Upstream, str]:
    """Turn an ``--upstream`` / ``--checkpoint`` string into an upstream and its display name.

    Args:
        spec: run dir / weights file, ``fbank``, ``logmel``, ``logmel+delta`` or ``random:PRESET``.
        device: where to put it.
        seed: initialisation seed of ``random:PRESET``.

    Returns:
        (upstream in eval mode, name recorded in caches and results).
    """
    if spec in FEATURE_BASELINES:
        return build_feature_upstream(spec).to(device), spec
    if spec.startswith(RANDOM_PREFIX):
        preset = spec[len(RANDOM_PREFIX):]
        name = spec if seed == 0 else f"{spec}@seed{seed}"
        return build_random_upstream(preset, seed).to(device), name
    return hub.load(spec, device=device), spec


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the state dict: names, shapes and values.

    Two upstreams with the same fingerprint give the same features, so a cache made by one
    is valid for the other; a retrained checkpoint at the same path gets a new fingerprint.
    """
    return tensors_checksum(module.state_dict())[:16]


@dataclass(frozen=True)
class UpstreamInfo:
    """What caches and result records say about an upstream."""

    name: str
    params: int
    num_hidden_states: int
    hidden_size: int
    frame_shift: float
    fingerprint: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe_upstream(upstream: Upstream, name: str) -> UpstreamInfo:
    """Name, parameter count, shape facts and weights fingerprint of ``upstream``."""
    cfg = getattr(upstream, "config", None)
    kind = "features" if isinstance(upstream, FeatureUpstream) else (
        getattr(cfg, "family", None) or type(upstream).__name__)
    fp = weights_fingerprint(upstream)
    if isinstance(upstream, FeatureUpstream):
        # A front-end's weights (mel filters) do not capture all its settings: add its config.
        fcfg = getattr(upstream.frontend, "config", None)
        extra = json.dumps(fcfg.to_dict(), sort_keys=True) if hasattr(fcfg, "to_dict") else repr(upstream.frontend)
        fp = hashlib.sha256((fp + extra).encode()).hexdigest()[:16]
    return UpstreamInfo(name=name, params=count_parameters(upstream),
                        num_hidden_states=int(upstream.num_hidden_states),
                        hidden_size=int(upstream.hidden_size), frame_shift=float(upstream.frame_shift),
                        fingerprint=fp, kind=str(kind))
