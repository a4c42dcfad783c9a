"""One probe: train a head on an upstream's features for one task, report accuracy.

Two modes (REFERENCE.md section 2):

* **frozen** (default): the upstream never runs here. Features come from the on-disk cache
  of :mod:`aviary.evaluate.cache` (memory-mapped), so every layer and head of a sweep
  shares one extraction. Frame-level batches are ``batch_frames`` shuffled frames of a
  split held in memory (or, for splits too big for memory, whole utterances streamed from
  the cache); utterance-level tasks mean-pool each utterance once up front
  (pooling commutes with the weighted sum, which is linear, and the optional per-frame layer
  norm is applied before pooling), so an epoch is a few matrix products.
* **fine-tune** (``finetune=True``): upstream + featurizer + head train together on raw
  audio, the upstream with its own, smaller learning rate (both are recorded).

How a probe is fitted (see :class:`ProbeConfig`): frozen **linear** probes are solved, not
trained: L2-regularised multinomial logistic regression by full-batch L-BFGS on the
standardised training features, the L2 strength chosen on valid (:mod:`aviary.evaluate.solver`),
with iterations and convergence recorded. **MLP** probes and **fine-tuning** train with
AdamW for a budget of optimiser steps (warmup + cosine decay), the learning rate chosen on
valid from a small grid unless given, keeping the best valid evaluation's weights. Every
record carries a 95 % bootstrap interval of its test accuracy over test utterances
(:mod:`aviary.evaluate.metrics`). Seeds fix initialisation, data order and the bootstrap.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import Config, ConfigError, check, check_choice, check_range
from aviary.data.sampler import padded_batches
from aviary.evaluate.cache import FeatureCache, load_waveforms
from aviary.evaluate.featurizers import WeightedSum, build_featurizer, layer_index, parse_layer_spec
from aviary.evaluate.heads import DEFAULT_HIDDEN, HEADS, build_head
from aviary.evaluate.metrics import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL, bootstrap_interval, group_counts
from aviary.evaluate.solver import DEFAULT_L2_GRID, solve_linear, standardize_stats
from aviary.evaluate.tasks import (IGNORE_INDEX, class_names, get_task, label_fraction_subset,
                                   phone_frame_labels, utterance_label)
from aviary.lengths import valid_mask
from aviary.precision import PRECISIONS, autocast_context, from_legacy_autocast, resolve_precision

log = logging.getLogger(__name__)

#: Where the solved probe's L2 path starts (ProbeConfig.l2_start).
L2_STARTS = ("middle", "strongest")
#: Where lr auto is chosen (ProbeConfig.lr_per, DemoConfig.probe_lr_per; the CLI spells its
#: choices itself so that parsing imports no torch).
LR_PER = ("probe", "sweep")


@dataclass(frozen=True)
class ProbeConfig(Config):
    """One probe's settings (saved in every result record).

    ``layer`` is a string so the config stays plain JSON: ``"3"``, ``"last"`` or ``"weighted"``.

    How a probe is fitted (``solver``):

    * ``"auto"`` (default): frozen linear probes (single layer or weighted sum) are *solved*
      by L-BFGS (:mod:`aviary.evaluate.solver`) when the training features fit in memory,
      with the L2 strength chosen on valid from ``l2_grid``; MLP heads, fine-tuning and
      splits too big for memory train with AdamW for ``steps`` optimiser steps.
    * ``"lbfgs"``: as auto, but an error instead of the fallback for a non-linear head.
    * ``"adam"``: always the step-budgeted AdamW trainer.

    The AdamW trainer runs a fixed budget of ``steps`` (linear warmup over 5 %, then cosine
    decay to 0), so a small corpus gets as many updates as a large one. ``lr=None`` (the
    default, ``--lr auto``) tries every ``lr_grid`` value for ``lr_trial_fraction`` of the
    budget from the same initialisation and data order, keeps the one with the best valid
    accuracy and continues it to the end (the trial steps are not wasted); when the largest
    value wins, up to ``lr_extend`` values x 3 beyond the grid are tried as well. Valid accuracy is
    measured every ``eval_every`` steps; the best evaluation's weights are kept and training
    stops after ``patience`` evaluations without improvement.

    Frozen features are standardised per feature (and per layer) on the training split first.
    """

    task: Literal["phone", "speaker", "keyword"] = "phone"
    head: Literal["linear", "mlp1", "mlp2"] = "linear"
    layer: str = "last"
    hidden: int = DEFAULT_HIDDEN  # width of MLP heads; s3prl uses 768, see heads.py
    dropout: float = 0.0
    layer_norm: bool = False  # parameter-free layer norm per layer before the weighted sum
    label_fraction: float = 1.0
    seed: int = 0
    finetune: bool = False
    solver: Literal["auto", "lbfgs", "adam"] = "auto"
    # L-BFGS (linear, frozen): L2 on the weights of the mean cross-entropy, standardised
    # features; tried strongest first, each solve warm-started from the previous one.
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    # Where the L2 path starts: "middle" (weaker first, stronger only if the start stays best;
    # 35-40 % fewer iterations on the demo's phone layers, the same l2) or "strongest" (the
    # whole path from the strongest). See aviary/evaluate/solver.py.
    l2_start: Literal["middle", "strongest"] = "middle"
    max_iter: int = 100  # L-BFGS iterations per L2 value
    # Converged = max |gradient| of the mean loss on whitened features <= tol. None (auto):
    # 0.1 / sqrt(training examples), a tenth of the gradient's own sampling noise (solver.auto_tol:
    # 2.4x fewer iterations than 1e-4 on the demo's phone probes, valid within 0.07 points).
    # On unwhitened features 1e-3 let a warm-started weaker L2 pass before moving (solver.py).
    tol: float | None = None
    # AdamW (MLP heads, fine-tuning, fallback): budget in optimiser steps, lr None = auto.
    lr: float | None = None  # head (and weighted-sum weights)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    # When the largest lr of the grid wins its trial, the grid was too low: try lr x 3 up to
    # this many more times while that keeps winning (the demo's MLP probes: 1e-2 beat 3e-3 by
    # 6 points on valid for every layer, so the old grid stopped at its own edge).
    lr_extend: int = 2
    lr_trial_fraction: float = 0.2
    # Where lr auto is chosen: "probe" = every probe runs its own trials; "sweep" = the first
    # AdamW probe of each (task, head, label fraction, seed) of a sweep runs them and the
    # sweep's later probes of that group train at its choice (records: lr_source = its key).
    # In the demo all 26 MLP probes of a 3-seed run chose the same lr with the same trial
    # ranking, and the trials were ~45 % of their steps (issue 15).
    lr_per: Literal["probe", "sweep"] = "probe"
    steps: int = 1000
    eval_every: int = 0  # 0: steps // 10
    upstream_lr: float = 5e-5  # fine-tuning only: the pretrained weights move more slowly
    weight_decay: float = 0.0
    patience: int = 4  # evaluations without a better valid accuracy before stopping
    # Frozen frame-level: frames per step (drawn from the whole split when held in memory).
    batch_frames: int = 4096
    batch_utterances: int = 64  # frozen utterance-level: utterances per step
    batch_seconds: float = 40.0  # fine-tuning: padded audio seconds per step
    # Head (frozen AdamW) / upstream + head (fine-tune) matmuls: auto = bf16 where native
    # (aviary.precision). Not part of the probe's key: it says how, not what, was measured.
    precision: str = "auto"
    bootstrap: int = DEFAULT_BOOTSTRAP  # replicates of the test-accuracy interval (utterances resampled)

    def validate(self) -> None:
        check_choice("head", self.head, HEADS)
        try:
            parse_layer_spec(self.layer)
        except ValueError as e:
            check(False, "layer", self.layer, f"an integer >= 0, 'last' or 'weighted' ({e})")
        check_range("hidden", self.hidden, 1, None)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("label_fraction", self.label_fraction, 0.0, 1.0, lo_open=True)
        check(len(self.l2_grid) > 0 and all(v >= 0 for v in self.l2_grid), "l2_grid", self.l2_grid,
              "one or more values >= 0")
        check_range("max_iter", self.max_iter, 1, None)
        check_choice("l2_start", self.l2_start, L2_STARTS)
        if self.tol is not None:
            check_range("tol", self.tol, 0.0, None, lo_open=True)
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, None, lo_open=True)
        check_range("lr_extend", self.lr_extend, 0, 10)
        check(len(self.lr_grid) > 0 and all(v > 0 for v in self.lr_grid), "lr_grid", self.lr_grid,
              "one or more values > 0")
        check_range("lr_trial_fraction", self.lr_trial_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_choice("lr_per", self.lr_per, LR_PER)
        check_range("steps", self.steps, 1, None)
        check_range("eval_every", self.eval_every, 0, None)
        check_range("upstream_lr", self.upstream_lr, 0.0, None, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("patience", self.patience, 1, None)
        check_range("batch_frames", self.batch_frames, 1, None)
        check_range("batch_utterances", self.batch_utterances, 1, None)
        check_range("batch_seconds", self.batch_seconds, 0.0, None, lo_open=True)
        check_range("bootstrap", self.bootstrap, 10, None)
        check_choice("precision", self.precision, PRECISIONS)

    @classmethod
    def from_dict(cls, data: Any, _prefix: str = "") -> "ProbeConfig":
        """As :meth:`Config.from_dict`; the old ``autocast`` key (``none`` / ``bf16``, in
        configs of records written before issue 14) is read as ``precision``."""
        return super().from_dict(upgrade_legacy(data), _prefix)

    @property
    def mode(self) -> str:
        return "finetune" if self.finetune else "frozen"

    @property
    def layer_value(self) -> int | str:
        """The layer as recorded: an int, ``"last"`` or ``"weighted"``."""
        return parse_layer_spec(self.layer)

    @property
    def uses_lbfgs(self) -> bool:
        """Whether a frozen probe of this config is solved (given features that fit in memory)."""
        return not self.finetune and self.head == "linear" and self.solver in ("auto", "lbfgs")

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)


def upgrade_legacy(overrides: Any) -> Any:
    """ProbeConfig fields with an old ``autocast`` key replaced by ``precision``."""
    if not isinstance(overrides, dict) or "autocast" not in overrides:
        return overrides
    out = dict(overrides)
    precision = from_legacy_autocast(out.pop("autocast"))
    if out.get("precision", precision) != precision:
        raise ConfigError(f"both autocast and precision given and they disagree: {overrides}")
    log.warning("probe setting 'autocast' is deprecated: use precision (auto, fp32, bf16, fp16)")
    out["precision"] = precision
    return out


@dataclass
class ProbeResult:
    """Outcome of :func:`train_probe`.

    ``fit`` holds the solver's record entries (``solver``, ``iterations``, ``converged``,
    ``l2``, ``lr``, ``lr_trials``, ``steps_run``, ``best_step`` ...); ``test_correct`` /
    ``test_total`` the per-utterance counts behind ``test_acc`` (for its interval).
    """

    valid_acc: float
    test_acc: float
    train_seconds: float
    train_examples: int
    weights: list[float] | None
    history: list[float]
    fit: dict[str, Any]
    test_correct: np.ndarray
    test_total: np.ndarray
    precision: str = "fp32"  # resolved precision of the training / evaluation matmuls


class ProbeModel(nn.Module):
    """(layer norm) -> (standardisation) -> featurizer -> head.

    Args:
        featurizer: ``(..., N, H) -> (..., H)``.
        head: ``(..., H) -> (..., C)``.
        mean, std: ``(N, H)`` training-split statistics of the stacked input (frozen probes);
            ``None`` leaves the input as it is (fine-tuning).
        layer_norm: parameter-free layer norm of each layer before standardising (frozen
            frame-level weighted sums with ``layer_norm``; utterance-level inputs have it
            applied per frame before pooling).
    """

    def __init__(self, featurizer: nn.Module, head: nn.Module, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, layer_norm: bool = False) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.head = head
        self.layer_norm = layer_norm
        self.register_buffer("mean", None if mean is None else mean.float())
        self.register_buffer("std", None if std is None else std.float())

    def prepare(self, stacked: torch.Tensor) -> torch.Tensor:
        # stacked: (..., N, H), standardised like the training split
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        if self.mean is not None:
            stacked = (stacked - self.mean) / self.std
        return stacked

    def prepare_layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """:meth:`prepare` of the ``i``-th stacked layer alone: ``(..., H) -> (..., H)``."""
        if self.layer_norm:
            x = F.layer_norm(x, x.shape[-1:])
        if self.mean is not None:
            x = (x - self.mean[i]) / self.std[i]
        return x

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        # stacked: (..., N, H) -> logits (..., C)
        return self.head(self.featurizer(self.prepare(stacked)))

    def forward_prepared(self, layers: torch.Tensor) -> torch.Tensor:
        """Logits from layer-major features already prepared (``(N, b, H)``, float32, as
        :class:`_PreparedFrames` holds them). The weighted sum is mixed in float32 (one
        matrix-vector product); the head runs under the caller's precision."""
        f = self.featurizer
        if isinstance(f, WeightedSum):
            if f.layer_norm:
                raise ValueError("forward_prepared: the featurizer's own layer norm is not prepared")
            with torch.autocast(layers.device.type, enabled=False):
                h = f.mix_layer_major(layers)
        else:
            h = layers[f.index]
        return self.head(h)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def _stacked_layers(cfg: ProbeConfig, num_hidden_states: int, available: Sequence[int]) -> list[int]:
    """Which hidden states a probe must read (all L+1 for the weighted sum)."""
    k = layer_index(cfg.layer_value, num_hidden_states)
    need = list(range(num_hidden_states)) if k is None else [k]
    missing = [i for i in need if i not in available]
    if missing:
        raise ValueError(f"layer(s) {missing} needed by layer={cfg.layer!r} are not available "
                         f"(cached layers: {list(available)})")
    return need


def _make_model(cfg: ProbeConfig, num_hidden_states: int, stacked: list[int], hidden_size: int,
                num_classes: int, layer_norm_in_featurizer: bool, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None, layer_norm_first: bool = False) -> ProbeModel:
    feat = build_featurizer(cfg.layer_value, num_hidden_states, layer_norm=layer_norm_in_featurizer,
                            stacked_indices=stacked)
    head = build_head(cfg.head, hidden_size, num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    return ProbeModel(feat, head, mean, std, layer_norm_first)


def _weights_of(model: ProbeModel) -> list[float] | None:
    f = model.featurizer
    return f.normalized_weights() if isinstance(f, WeightedSum) else None


class _EarlyStopper:
    """Keeps the best epoch's state dicts; stops after ``patience`` epochs without a better one.

    "Better" = higher valid accuracy, ties broken by lower valid loss: with small valid sets
    several epochs share the top accuracy, and the first of them is often under-trained.
    """

    def __init__(self, modules: dict[str, nn.Module], patience: int) -> None:
        self.modules = modules
        self.patience = patience
        self.best = -1.0
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad = 0
        self.state: dict[str, Any] = {}

    def update(self, acc: float, loss: float, epoch: int) -> bool:
        """Record an epoch; returns True when training should stop."""
        if acc > self.best or (acc == self.best and loss < self.best_loss):
            self.best, self.best_loss, self.best_epoch, self.bad = acc, loss, epoch, 0
            self.state = {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(self.state[k])


# ----------------------------------------------------------------------------- frozen mode


def _cached_frame_labels(cache: FeatureCache, utt: Any) -> np.ndarray:
    """Frame labels of ``utt`` at the cache's frame rate, computed once per cache and process.

    A sweep trains many probes on the same cache; the labels only depend on the alignment,
    the cached length and the frame shift, so they are memoised on the cache object.
    """
    key = ("phone_labels", str(utt.id))
    if key not in cache.memo:
        cache.memo[key] = phone_frame_labels(utt, cache.length(str(utt.id)), cache.frame_shift)
    return cache.memo[key]


# Frame-level splits up to this size (bytes over the layers a probe reads) are held in
# memory and batched as shuffled frames; bigger ones stream whole utterances from the cache.
# The default synthetic corpus is ~130 MB per layer of a 256-wide model.
PRELOAD_BYTES = 3 * 1024 ** 3
# Standardised float32 copies of preloaded layers kept for a sweep's later probes
# (_FrameData.prepared); the oldest are dropped beyond this. The demo holds ~1 GB per upstream.
PREPARED_BYTES = 4 * 1024 ** 3


class _FrameData:
    """Frame-level examples of one split.

    Small splits (under :data:`PRELOAD_BYTES`) are read once into memory: the labelled frames
    of every utterance, one ``(N, H)`` array per layer (in the cache's dtype), memoised on the cache so a
    sweep over layers and heads reads each layer once. Training batches are then
    ``batch_frames`` frames drawn without replacement from the whole split (frame-level
    shuffling: each step sees many utterances and speakers, so a probe converges in fewer
    epochs than with whole-utterance batches), gathered from those arrays.

    Bigger splits stream from the memory-mapped cache: a batch is whole utterances, in
    shuffled order, concatenated up to ``batch_frames`` frames.

    Unaligned frames (label -100) are dropped when preloading and ignored by the loss and the
    accuracy when streaming.
    """

    def __init__(self, cache: FeatureCache, utts: Sequence[Any], layers: list[int],
                 preload_bytes: int | None = None) -> None:
        self.cache = cache
        self.layers = layers
        self.ids = [str(u.id) for u in utts]
        self.labels = [_cached_frame_labels(cache, u) for u in utts]
        self.num_frames = int(sum(int((lab != IGNORE_INDEX).sum()) for lab in self.labels))
        limit = PRELOAD_BYTES if preload_bytes is None else preload_bytes
        itemsize = cache.get(self.ids[0], layers[0]).dtype.itemsize if self.ids else 2
        self.preloaded = bool(self.ids) and self.num_frames * len(layers) * cache.hidden_size * itemsize <= limit
        if self.preloaded:
            self._split_key = hash(tuple(self.ids))
            keep = [lab != IGNORE_INDEX for lab in self.labels]
            self._keep = keep
            self.y = torch.from_numpy(np.concatenate([lab[k] for lab, k in zip(self.labels, keep)]))  # (N,)
            self.x = [self._layer_frames(k) for k in layers]  # each (N, H)

    def _layer_frames(self, layer: int) -> torch.Tensor:
        key = ("frames", self._split_key, layer)
        if key not in self.cache.memo:
            dtype = self.cache.get(self.ids[0], layer).dtype  # the cache's (float16 by default)
            out = np.empty((self.num_frames, self.cache.hidden_size), dtype=dtype)
            n = 0
            for uid, keep in zip(self.ids, self._keep):
                rows = self.cache.get(uid, layer)[keep]  # (T_labelled, H)
                out[n:n + len(rows)] = rows
                n += len(rows)
            self.cache.memo[key] = torch.from_numpy(out)
        return self.cache.memo[key]

    def eval_groups(self) -> np.ndarray:
        """Utterance index of every example that ``batches(..., None)`` yields, in that order."""
        if self.preloaded:
            counts = [int(k.sum()) for k in self._keep]
        else:
            counts = [len(lab) for lab in self.labels]
        return np.repeat(np.arange(len(self.ids)), counts)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer and feature mean and std ``(N, H)`` over the labelled frames (float64 sums)."""
        n = len(self.layers)
        s1 = torch.zeros(n, self.cache.hidden_size, dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        count = 0
        if self.preloaded:
            # Per layer, memoised: a sweep's probes of one layer (and its weighted sums) share them.
            for i, layer in enumerate(self.layers):
                s1[i], s2[i] = self._layer_sums(layer)
            count = len(self.y)
        else:
            for uid, lab in zip(self.ids, self.labels):
                xb = torch.from_numpy(self._features(uid)[lab != IGNORE_INDEX]).double()  # (T, N, H)
                s1 += xb.sum(0)
                s2 += (xb * xb).sum(0)
                count += len(xb)
        mean = s1 / max(count, 1)
        var = (s2 / max(count, 1) - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().clamp_min(1e-6).float()

    def _layer_sums(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("sums", self._split_key, layer)
        if key not in self.cache.memo:
            x = self.x[self.layers.index(layer)]
            s1 = torch.zeros(self.cache.hidden_size, dtype=torch.float64)
            s2 = torch.zeros_like(s1)
            for s in range(0, len(x), 65536):
                xb = x[s:s + 65536].double()
                s1 += xb.sum(0)
                s2 += (xb * xb).sum(0)
            self.cache.memo[key] = (s1, s2)
        return self.cache.memo[key]

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All labelled frames as float32, layer-major ``(N, n, H)``, and their labels (preloaded splits only)."""
        if not self.preloaded:
            raise ValueError("full(): split not held in memory")
        return torch.stack([x.float() for x in self.x], dim=0), self.y

    def prepared(self, model: "ProbeModel") -> "_PreparedFrames":
        """This (preloaded) split as ``model`` sees it after :meth:`ProbeModel.prepare`, one
        float32 ``(n, H)`` per layer (see :class:`_PreparedFrames`). Memoised on the cache by
        split, layer, layer norm and the standardisation's values, so the probes of a sweep that
        read a layer with the same training statistics (its linear and MLP heads, the weighted
        sums) prepare it once. One prepared copy per split and layer is kept (other statistics,
        e.g. another label fraction's, replace it), so memory stays ~3x the split's cached size."""
        if not self.preloaded:
            raise ValueError("prepared(): split not held in memory")
        out: list[torch.Tensor] = []
        mine: set[Any] = set()
        with torch.no_grad():
            for i, (layer, x) in enumerate(zip(self.layers, self.x)):
                stats = b"" if model.mean is None else model.mean[i].numpy().tobytes() + model.std[i].numpy().tobytes()
                key = ("prepared", self._split_key, layer, bool(model.layer_norm))
                held = self.cache.memo.get(key)
                if held is None or held[0] != stats:
                    self.cache.memo.pop(key, None)
                    px = torch.empty(len(x), x.shape[-1], dtype=torch.float32)
                    for s in range(0, len(x), 65536):
                        px[s:s + 65536] = model.prepare_layer(x[s:s + 65536].float(), i)
                    held = self.cache.memo[key] = (stats, px)
                mine.add(key)
                out.append(held[1])
        _evict_prepared(self.cache.memo, keep=mine)
        return _PreparedFrames(out, self.y)

    def _features(self, uid: str) -> np.ndarray:
        if len(self.layers) == 1:
            return self.cache.get(uid, self.layers[0])[:, None, :]  # (T, 1, H) view, no copy
        return np.stack([self.cache.get(uid, k) for k in self.layers], axis=1)  # (T, N, H)

    def batches(self, batch_frames: int, rng: np.random.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.preloaded:
            yield from self._preloaded_batches(batch_frames, rng)
            return
        order = np.arange(len(self.ids)) if rng is None else rng.permutation(len(self.ids))
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        n = 0
        for i in order:
            xs.append(self._features(self.ids[i]))
            ys.append(self.labels[i])
            n += len(ys[-1])
            if n >= batch_frames:
                yield torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
                xs, ys, n = [], [], 0
        if xs:
            yield torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def _preloaded_batches(self, batch_frames: int, rng: np.random.Generator | None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = None if rng is None else torch.from_numpy(rng.permutation(n))
        for s in range(0, n, batch_frames):
            if order is None:  # evaluation: contiguous slices, no gather
                xs = [x[s:s + batch_frames] for x in self.x]
                y = self.y[s:s + batch_frames]
            else:
                idx = order[s:s + batch_frames]
                xs = [x[idx] for x in self.x]
                y = self.y[idx]
            yield torch.stack(xs, dim=1), y  # (b, N_layers, H), (b,)


def _evict_prepared(memo: dict[Any, Any], keep: set[Any], limit: int | None = None) -> None:
    """Drop the oldest prepared layers of ``memo`` (not those in ``keep``) while they hold more
    than ``limit`` bytes (default :data:`PREPARED_BYTES`)."""
    limit = PREPARED_BYTES if limit is None else limit
    held = [k for k in memo if isinstance(k, tuple) and k[:1] == ("prepared",)]  # oldest first
    total = sum(memo[k][1].nbytes for k in held)
    for k in held:
        if total <= limit:
            break
        if k not in keep:
            total -= memo.pop(k)[1].nbytes


class _PreparedFrames:
    """A split held in memory, standardised (and layer-normed) once, not every batch: a
    frame-level split (:meth:`_FrameData.prepared`) or pooled utterances (:meth:`_PooledData.prepared`).

    ``x`` holds one float32 ``(n, H)`` per stacked layer: what :meth:`ProbeModel.prepare` makes
    of each example. A training step gathers the batch's rows of every layer (``index_select``)
    into a layer-major ``(N, b, H)`` batch, where the weighted sum is a matrix-vector product
    over contiguous memory (:meth:`ProbeModel.forward_prepared`). Batches are drawn exactly as
    :meth:`_FrameData.batches` draws them (the same permutation for the same ``rng``).
    Measured on the demo's weighted-sum MLP probe (7 layers x 77.8k frames; 2-core Zen 4,
    bf16): standardising, gathering, stacking and casting every batch cost 14 s of its 19 s
    (issue 15).
    """

    def __init__(self, x: list[torch.Tensor], y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-major ``(N, n, H)`` (a view for one layer) and the labels."""
        return (self.x[0][None] if len(self.x) == 1 else torch.stack(self.x)), self.y

    def batches(self, batch_frames: int, rng: np.random.Generator | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = None if rng is None else torch.from_numpy(rng.permutation(n))
        for s in range(0, n, batch_frames):
            if order is None:  # evaluation: contiguous slices
                if len(self.x) == 1:
                    yield self.x[0][None, s:s + batch_frames], self.y[s:s + batch_frames]
                else:
                    yield torch.stack([x[s:s + batch_frames] for x in self.x]), self.y[s:s + batch_frames]
            else:
                idx = order[s:s + batch_frames]
                # One index_select per layer: 4x faster than along dim 1 of an (N, n, H) tensor.
                xb = torch.empty(len(self.x), len(idx), self.x[0].shape[-1], dtype=torch.float32)
                for i, x in enumerate(self.x):
                    torch.index_select(x, 0, idx, out=xb[i])
                yield xb, self.y[idx]


class UninformativeFeatures(ValueError):
    """An utterance-level probe whose pooled features are the same for every utterance.

    Per-utterance CMVN (the ``logmel`` baseline) makes each utterance's mean frame zero, so a
    mean-pooled probe of it classifies float rounding: the demo's log-mel speaker probe read
    3 % (chance 2.5 %) while fbank, the same spectra without it, read 96 %. Refused instead of
    reported as a measurement.
    """


#: Pooled features whose spread across utterances is below this fraction of the frames' spread
#: within utterances carry nothing (CMVN'd log-mel: ~1e-8; real features: 0.1 .. 1).
POOLED_SPREAD_FLOOR = 1e-4


class _PooledData:
    """Utterance-level examples: per-layer mean over valid frames, computed once."""

    def __init__(self, cache: FeatureCache, utts: Sequence[Any], layers: list[int], labels: list[int],
                 layer_norm: bool) -> None:
        pooled = np.zeros((len(utts), len(layers), cache.hidden_size), dtype=np.float32)
        within = np.zeros(len(layers), dtype=np.float64)  # sum of squared deviations from the utterance mean
        frames = 0
        for i, u in enumerate(utts):
            x = torch.from_numpy(cache.get_stacked(str(u.id), layers))  # (T, N, H)
            if layer_norm:
                # Per-frame layer norm must come before pooling (it is not linear).
                x = F.layer_norm(x, x.shape[-1:])
            mean = x.mean(dim=0)
            pooled[i] = mean.numpy()
            within += (x.double() - mean.double()).pow(2).mean(-1).sum(0).numpy()
            frames += x.shape[0]
        self.x = torch.from_numpy(pooled)  # (U, N, H)
        self.y = torch.tensor(labels, dtype=torch.long)  # (U,)
        self.num_examples = len(utts)
        self.layers = list(layers)
        self._within_rms = np.sqrt(within / max(frames, 1))  # (N,)

    def check_informative(self) -> None:
        """Raise :class:`UninformativeFeatures` when every layer pools to the same vector for
        every utterance (its largest across-utterance standard deviation is below
        :data:`POOLED_SPREAD_FLOOR` of the frames' RMS spread within utterances); a weighted
        sum with one such layer among informative ones is fine (that layer adds nothing)."""
        if self.num_examples < 2:
            return
        across = self.x.double().std(0).amax(-1).numpy()  # (N,)
        ratio = across / np.maximum(self._within_rms, 1e-30)
        flat = [(layer, float(r)) for layer, r in zip(self.layers, ratio) if r < POOLED_SPREAD_FLOOR]
        if len(flat) == len(self.layers):
            layer, r = flat[0]
            raise UninformativeFeatures(
                f"utterance-level probe: the mean-pooled features of layer(s) {[f[0] for f in flat]} are the same "
                f"for every utterance (spread across utterances {r:.1e} of the spread within them): the upstream "
                "normalises each utterance (e.g. per-utterance CMVN), so mean pooling leaves nothing to classify")

    preloaded = True

    def eval_groups(self) -> np.ndarray:
        return np.arange(self.num_examples)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return standardize_stats(self.x)

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.permute(1, 0, 2).contiguous(), self.y  # (N, U, H) layer-major

    def prepared(self, model: "ProbeModel") -> "_PreparedFrames":
        """The pooled utterances as ``model`` sees them after :meth:`ProbeModel.prepare` (small:
        not memoised); batched like :meth:`batches`."""
        with torch.no_grad():
            return _PreparedFrames([model.prepare_layer(self.x[:, i], i).contiguous() for i in range(len(self.layers))],
                                   self.y)

    def batches(self, batch: int, rng: np.random.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.arange(len(self.y)) if rng is None else torch.from_numpy(rng.permutation(len(self.y)))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            yield self.x[idx], self.y[idx]


# One epoch loop for both modes: the frozen probe and fine-tuning differ only in what a batch
# is (cached features or utterance indices) and how it becomes (logits, targets).

#: A batch -> (logits (..., C), targets (...) with IGNORE_INDEX where unlabelled).
Forward = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def _epochs(seed: int, epoch: Callable[[np.random.Generator], Iterable[Any]]) -> Iterator[Any]:
    """Training batches forever: epoch ``e`` is ``epoch(rng)`` with ``rng`` seeded by ``(seed, e)``."""
    e = 0
    while True:
        yield from epoch(np.random.default_rng([seed, e]))
        e += 1


def _adam_step(modules: Sequence[nn.Module], opt: torch.optim.Optimizer, stream: Iterator[Any],
               forward: Forward, check: Callable[[torch.Tensor], None] | None = None) -> Callable[[], None]:
    """One optimiser step on the next batch of ``stream``: mean cross-entropy over labelled targets."""
    def step() -> None:
        for m in modules:
            m.train()
        logits, y = forward(next(stream))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
        if check is not None:
            check(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _score(modules: Sequence[nn.Module], batches: Iterable[Any], forward: Forward,
           on_batch: Callable[[Any, torch.Tensor, torch.Tensor], None] | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the labelled targets of ``batches``, in eval mode.

    ``on_batch(batch, correct, labelled)`` sees each batch's boolean masks (per-example scores).
    """
    for m in modules:
        m.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch in batches:
            logits, y = forward(batch)
            valid = y != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum"))
            ok = (logits.argmax(-1) == y) & valid
            correct += int(ok.sum())
            total += int(valid.sum())
            if on_batch is not None:
                on_batch(batch, ok, valid)
    return correct / max(total, 1), loss_sum / max(total, 1)


def _frozen_forward(model: nn.Module, precision: str, prepared: bool = False) -> Forward:
    """Cached features ``(x, y)`` -> the probe's logits under ``precision`` (``prepared``:
    layer-major batches of :class:`_PreparedFrames`)."""
    def forward(xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = xy
        with autocast_context(precision, x.device):
            if prepared:
                return model.forward_prepared(x).float(), y
            return model(x.float()).float(), y

    return forward


def _evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
              precision: str = "fp32", per_example: bool = False, prepared: bool = False
              ) -> tuple[float, float] | tuple[float, float, np.ndarray]:
    """(accuracy, mean cross-entropy) of a frozen probe over the labelled examples of the batches.

    With ``per_example`` also the correctness of every example yielded (ignored ones False),
    in order, for the bootstrap interval.
    """
    hits: list[np.ndarray] = []
    on_batch = (lambda _b, ok, _v: hits.append(ok.reshape(-1).cpu().numpy())) if per_example else None
    acc, loss = _score([model], batches, _frozen_forward(model, precision, prepared), on_batch)
    if per_example:
        return acc, loss, (np.concatenate(hits) if hits else np.zeros(0, dtype=bool))
    return acc, loss


def _schedule(step: int, total: int) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear warmup over 5 %, cosine decay to 0."""
    warmup = max(1, math.ceil(0.05 * total))
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


@dataclass(frozen=True)
class ChosenLR:
    """A learning rate chosen on valid by another probe of the sweep (``lr_per="sweep"``)."""

    lr: float
    source: str  # the key of the probe whose trials chose it

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "ChosenLR":
        """The choice a probe's record holds (its ``lr``, chosen by its own trials)."""
        return cls(float(rec["lr"]), rec["key"])


@dataclass
class _Candidate:
    """One AdamW run of the budget: its modules, optimiser, one-step and valid functions."""

    lr: float
    modules: dict[str, nn.Module]
    opt: torch.optim.Optimizer
    step: Callable[[], None]
    evaluate: Callable[[], tuple[float, float]]
    done: int = 0


def _advance(c: _Candidate, n: int, total: int) -> None:
    for _ in range(n):
        f = _schedule(c.done, total)
        for g in c.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        c.step()
        c.done += 1


def _train_budget(cfg: ProbeConfig, make: Callable[[float], _Candidate], progress: Any = None,
                  label: str = "", chosen_lr: ChosenLR | None = None
                  ) -> tuple[_Candidate, list[float], dict[str, Any]]:
    """Run the step budget, choosing the learning rate on valid when ``cfg.lr`` is None
    (unless ``chosen_lr`` brings the choice another probe of the sweep made: ``lr_per="sweep"``).

    Every candidate learning rate starts from the same initialisation and data order
    (``make`` seeds both) and trains the first ``lr_trial_fraction`` of the budget under the
    full-budget schedule; the best on valid (accuracy, then loss) continues to the end.

    Returns:
        The winning candidate (its modules hold the best evaluation's weights), the valid
        accuracy history of its evaluations, and the record entries of the fit.
    """
    total = cfg.steps
    if cfg.lr is not None:
        lrs, chosen_lr = [float(cfg.lr)], None
    elif chosen_lr is not None:
        lrs = [float(chosen_lr.lr)]
    else:
        lrs = sorted(float(v) for v in cfg.lr_grid)
    trials: list[dict[str, Any]] = []
    history: list[float] = []
    if len(lrs) == 1:
        best = make(lrs[0])
    else:
        n_trial = max(1, math.ceil(cfg.lr_trial_fraction * total))
        best, best_key = None, None
        queue, extended = list(lrs), 0
        while queue:
            lr = queue.pop(0)
            c = make(lr)
            _advance(c, n_trial, total)
            acc, loss = c.evaluate()
            trials.append({"lr": lr, "valid_acc": round(acc, 6), "valid_loss": round(loss, 6), "steps": n_trial})
            if progress is not None:
                progress.set_postfix_str(f"{label} lr {lr:g} trial valid {acc:.3f}")
            if best_key is None or (acc, -loss) > best_key:
                best, best_key = c, (acc, -loss)
            del c
            if not queue and best.lr == lr and extended < cfg.lr_extend:  # the top of the grid won
                queue.append(lr * 3)
                extended += 1
        assert best is not None
        history.append(best_key[0])
    stopper = _EarlyStopper(best.modules, cfg.patience)
    if trials:
        stopper.update(best_key[0], -best_key[1], best.done)
    every = cfg.eval_interval
    while best.done < total:
        _advance(best, min(every - best.done % every, total - best.done), total)
        acc, loss = best.evaluate()
        history.append(acc)
        if progress is not None:
            progress.set_postfix_str(f"{label} step {best.done}/{total} valid {acc:.3f}")
        if stopper.update(acc, loss, best.done):
            break
    steps_run = best.done
    stopper.restore()
    fit = {"solver": "adam", "lr": best.lr, "lr_auto": cfg.lr is None, "lr_trials": trials or None,
           "lr_source": chosen_lr.source if chosen_lr is not None else None,
           "steps": total, "steps_run": steps_run, "best_step": stopper.best_epoch,
           # The trial steps of the losing learning rates count as work too.
           "steps_total": steps_run + sum(t["steps"] for t in trials if t["lr"] != best.lr),
           "iterations": None, "converged": None, "l2": None}
    return best, history, fit


def _solve_frozen(cfg: ProbeConfig, model: ProbeModel, data: dict[str, "_PreparedFrames"],
                  num_classes: int) -> dict[str, Any]:
    """Solve the linear probe by L-BFGS on the prepared (standardised) in-memory splits; load it into ``model``."""
    weighted = cfg.layer_value == "weighted"

    def prepared(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data[split].full()  # (N, n, H) layer-major: what the solver's mix wants
        return (x if weighted else x[0]).contiguous(), y

    sol = solve_linear(prepared("train"), prepared("valid"), num_classes, weighted=weighted, l2_grid=cfg.l2_grid,
                       max_iter=cfg.max_iter, tol=cfg.tol, patience=2,
                       start=0 if cfg.l2_start == "strongest" else None)
    head = model.head
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.copy_(sol.weight)
        head.bias.copy_(sol.bias)
        if weighted:
            assert isinstance(model.featurizer, WeightedSum)
            model.featurizer.weights.copy_(sol.layer_logits)
    return {"solver": "lbfgs", "l2": sol.l2, "iterations": sol.iterations, "iterations_total": sol.iterations_total,
            "converged": sol.converged, "grad_norm": float(f"{sol.grad_norm:.3g}"), "tol": float(f"{sol.tol:.3g}"), "rank": sol.rank,
            "l2_path": sol.path, "lr": None, "lr_auto": None, "lr_trials": None, "lr_source": None, "steps": None,
            "steps_run": None, "best_step": None}


def train_frozen(cfg: ProbeConfig, cache: FeatureCache, splits: dict[str, Sequence[Any]],
                 progress: Any = None, chosen_lr: ChosenLR | None = None) -> ProbeResult:
    """Fit and evaluate a probe from a feature cache.

    Linear heads are solved (L-BFGS, L2 chosen on valid) when the training features are held
    in memory; MLP heads (and linear ones on streamed splits, or with ``solver="adam"``) train
    with AdamW on a step budget. Features are standardised on the training split.

    Args:
        cfg: the probe.
        cache: an opened :class:`FeatureCache` holding every utterance of ``splits``.
        splits: ``{"train", "valid", "test"}`` utterances (train already cut to the label fraction).
        progress: optional tqdm bar whose postfix shows the progress.

    Returns:
        :class:`ProbeResult`.
    """
    spec = get_task(cfg.task)
    nhs = cache.num_hidden_states
    layers = _stacked_layers(cfg, nhs, cache.layers)
    classes = class_names(cfg.task, splits)
    if spec.level == "frame":
        data = {k: _FrameData(cache, v, layers) for k, v in splits.items()}
        n_train = data["train"].num_frames
        batch = cfg.batch_frames
        layer_norm_first = cfg.layer_norm
    else:
        cid = {c: i for i, c in enumerate(classes)}
        data = {k: _PooledData(cache, v, layers, [utterance_label(cfg.task, u, cid) for u in v], cfg.layer_norm)
                for k, v in splits.items()}
        data["train"].check_informative()
        n_train = data["train"].num_examples
        batch = cfg.batch_utterances
        layer_norm_first = False  # already applied per frame before pooling
    if n_train == 0:
        raise ValueError(f"task {cfg.task}: no labelled training examples")
    if cfg.solver == "lbfgs" and cfg.head != "linear":
        raise ValueError(f"solver 'lbfgs' solves linear heads only, not {cfg.head!r}; use solver 'auto' or 'adam'")
    t0 = time.perf_counter()
    if layer_norm_first:
        # Statistics of the layer-normed frames: standardise what the featurizer will see.
        mean, std = _layer_normed_moments(data["train"])
    else:
        mean, std = data["train"].moments()

    def build() -> ProbeModel:
        _seed_all(cfg.seed)
        return _make_model(cfg, nhs, layers, cache.hidden_size, len(classes), False, mean, std, layer_norm_first)

    label = f"{cfg.task}/{cfg.head}/L{cfg.layer}"
    solve = cfg.uses_lbfgs and all(d.preloaded for d in data.values())
    if cfg.solver == "lbfgs" and not solve:
        raise ValueError("solver 'lbfgs' needs the training features in memory (split larger than "
                         "probe.PRELOAD_BYTES); use solver 'auto' for the AdamW fallback")
    history: list[float] = []
    precision = resolve_precision(cfg.precision, "cpu")  # cached features live on the CPU
    eval_precision = precision
    # Splits held in memory (frame-level ones that fit, pooled ones always) are standardised
    # once by the model's prepare, not every batch, and batched layer-major; streamed splits go
    # through the model's own prepare per batch. The solver always gets prepared splits.
    prep = all(d.preloaded for d in data.values())
    model = build()
    test_data = data["test"]  # the split's utterance grouping, for the interval
    if prep:
        data = {k: d.prepared(model) for k, d in data.items()}
    if solve:
        if progress is not None:
            progress.set_postfix_str(f"{label} L-BFGS")
        fit = _solve_frozen(cfg, model, data, len(classes))
        eval_precision = precision = "fp32"  # the solution is exact in float32; score it so
        valid_acc, _ = _evaluate(model, data["valid"].batches(batch, None), prepared=prep)
        history = [p["valid_acc"] for p in fit["l2_path"]]
    else:
        def make(lr: float) -> _Candidate:
            model = build()
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
            for g in opt.param_groups:
                g["base_lr"] = lr
            # Epoch e shuffled by (seed, e); batches without a single aligned frame skipped.
            stream = _epochs(cfg.seed, lambda rng: ((x, y) for x, y in data["train"].batches(batch, rng)
                                                    if bool((y != IGNORE_INDEX).any())))
            step = _adam_step([model], opt, stream, _frozen_forward(model, precision, prep))
            return _Candidate(lr, {"model": model}, opt, step,
                              lambda: _evaluate(model, data["valid"].batches(batch, None), precision, prepared=prep))

        best, history, fit = _train_budget(cfg, make, progress, label, chosen_lr)
        model = best.modules["model"]
        fit["epochs"] = round(fit["steps_total"] * min(batch, n_train) / n_train, 2)  # passes over the data
        valid_acc, _ = _evaluate(model, data["valid"].batches(batch, None), precision, prepared=prep)
    train_seconds = time.perf_counter() - t0
    test_acc, _, hits = _evaluate(model, data["test"].batches(batch, None), eval_precision, per_example=True,
                                  prepared=prep)
    groups = test_data.eval_groups()
    scored = _scored_mask(test_data, len(hits))
    correct, _ = group_counts(hits, groups, len(splits["test"]))
    total, _ = group_counts(scored, groups, len(splits["test"]))
    return ProbeResult(valid_acc=valid_acc, test_acc=test_acc, train_seconds=train_seconds, train_examples=n_train,
                       weights=_weights_of(model), history=history, fit=fit, test_correct=correct, test_total=total,
                       precision=precision)


def _scored_mask(data: Any, n: int) -> np.ndarray:
    """Which of the ``n`` examples of ``batches(..., None)`` carry a label (streamed frames may not)."""
    if isinstance(data, _FrameData) and not data.preloaded:
        return np.concatenate([lab != IGNORE_INDEX for lab in data.labels])
    return np.ones(n, dtype=bool)


def _layer_normed_moments(data: "_FrameData") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / std ``(N, H)`` of the per-frame layer-normed training frames."""
    n = len(data.layers)
    s1 = torch.zeros(n, data.cache.hidden_size, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    count = 0
    for x, y in data.batches(65536, None):
        x = F.layer_norm(x.float(), x.shape[-1:])[y != IGNORE_INDEX].double()  # (b, N, H)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
        count += len(x)
    mean = s1 / max(count, 1)
    return mean.float(), (s2 / max(count, 1) - mean * mean).clamp_min(0.0).sqrt().clamp_min(1e-6).float()


# -------------------------------------------------------------------------- fine-tune mode


def _finetune_logits(upstream: nn.Module, model: ProbeModel, utts: Sequence[Any], stacked: list[int],
                     level: str, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward raw audio through upstream + probe; returns logits and valid-frame lengths."""
    wavs, wav_lengths = load_waveforms(utts, int(getattr(upstream, "sample_rate", 16000)), None)
    with autocast_context(precision, device):
        states, lengths = upstream.extract(wavs.to(device), wav_lengths.to(device), max_layer=max(stacked))
        x = torch.stack([states[k] for k in stacked], dim=2).float()  # (B, T, N, H)
        if level == "frame":
            return model(x).float(), lengths  # (B, T, C)
        feats = model.featurizer(x)  # (B, T, H)
        mask = valid_mask(lengths, feats.shape[1]).to(feats.dtype)
        pooled = (feats * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(feats.dtype)  # (B, H)
        return model.head(pooled).float(), lengths  # (B, C)


def _finetune_targets(utts: Sequence[Any], level: str, lengths: torch.Tensor, T: int, frame_shift: float,
                      task: str, cid: dict[str, int]) -> torch.Tensor:
    if level == "utterance":
        return torch.tensor([utterance_label(task, u, cid) for u in utts], dtype=torch.long)
    y = torch.full((len(utts), T), IGNORE_INDEX, dtype=torch.long)
    for b, u in enumerate(utts):
        n = int(lengths[b])
        y[b, :n] = torch.from_numpy(phone_frame_labels(u, n, frame_shift))
    return y  # (B, T)


def train_finetune(cfg: ProbeConfig, upstream: nn.Module, splits: dict[str, Sequence[Any]],
                   progress: Any = None, chosen_lr: ChosenLR | None = None) -> ProbeResult:
    """Train upstream + probe together on raw audio for ``cfg.steps`` steps (upstream modified in place).

    With ``lr=None`` every head learning rate of ``lr_grid`` gets its trial from the same
    pretrained weights (a copy of the upstream each); the upstream keeps its own ``upstream_lr``.

    Args:
        cfg: the probe (``finetune=True``).
        upstream: the :class:`~aviary.models.upstream.Upstream` to fine-tune.
        splits: train (already cut to the label fraction), valid and test utterances.
        progress: optional tqdm bar for the postfix.

    Returns:
        :class:`ProbeResult`; the upstream ends with the best valid evaluation's weights.
    """
    spec = get_task(cfg.task)
    nhs = int(upstream.num_hidden_states)
    stacked = _stacked_layers(cfg, nhs, list(range(nhs)))
    classes = class_names(cfg.task, splits)
    cid = {c: i for i, c in enumerate(classes)}
    device = next(iter(upstream.parameters())).device
    precision = resolve_precision(cfg.precision, device)
    if not [p for p in upstream.parameters() if p.requires_grad]:
        raise ValueError("fine-tuning needs an upstream with trainable parameters "
                         "(feature baselines such as fbank have none; probe them frozen)")
    durs = {k: [float(u.duration) for u in v] for k, v in splits.items()}
    frame_shift = float(upstream.frame_shift)
    initial = copy.deepcopy(upstream.state_dict())

    def forward(up: nn.Module, model: ProbeModel, utts: Sequence[Any]) -> Forward:
        """Indices into ``utts`` -> logits of upstream + probe and their targets."""
        def run(idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
            bu = [utts[i] for i in idx]
            logits, lengths = _finetune_logits(up, model, bu, stacked, spec.level, device, precision)
            y = _finetune_targets(bu, spec.level, lengths.cpu(), logits.shape[1] if spec.level == "frame" else 0,
                                  frame_shift, cfg.task, cid).to(device)
            return logits, y

        return run

    def run_split(up: nn.Module, model: ProbeModel, split: str, per_example: bool = False):
        utts = splits[split]
        order = sorted(range(len(utts)), key=lambda i: durs[split][i])
        per_utt_c = np.zeros(len(utts))
        per_utt_t = np.zeros(len(utts))

        def count(b: list[int], ok: torch.Tensor, valid: torch.Tensor) -> None:
            dims = tuple(range(1, ok.dim()))
            per_utt_c[b] = (ok.sum(dims) if dims else ok).cpu().numpy()
            per_utt_t[b] = (valid.sum(dims) if dims else valid).cpu().numpy()

        acc, loss = _score([up, model], padded_batches(order, durs[split], cfg.batch_seconds),
                           forward(up, model, utts), count)
        return (acc, loss, per_utt_c, per_utt_t) if per_example else (acc, loss)

    train = splits["train"]
    order = sorted(range(len(train)), key=lambda i: durs["train"][i])
    batches = padded_batches(order, durs["train"], cfg.batch_seconds)

    def make(lr: float) -> _Candidate:
        up = copy.deepcopy(upstream)
        up.load_state_dict(initial)
        _seed_all(cfg.seed)
        model = _make_model(cfg, nhs, stacked, int(upstream.hidden_size), len(classes), cfg.layer_norm).to(device)
        opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr, "base_lr": lr},
                                 {"params": [p for p in up.parameters() if p.requires_grad],
                                  "lr": cfg.upstream_lr, "base_lr": cfg.upstream_lr}], weight_decay=cfg.weight_decay)

        def finite(loss: torch.Tensor) -> None:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {float(loss)} at head lr {lr:g}; "
                                         "lower --lr / --upstream-lr")

        # Epoch e: the duration-sorted batches in an order shuffled by (seed, e).
        stream = _epochs(cfg.seed, lambda rng: (batches[bi] for bi in rng.permutation(len(batches))))
        step = _adam_step([up, model], opt, stream, forward(up, model, train), finite)
        return _Candidate(lr, {"model": model, "upstream": up}, opt, step, lambda: run_split(up, model, "valid"))

    t0 = time.perf_counter()
    best, history, fit = _train_budget(cfg, make, progress, f"finetune {cfg.task}/{cfg.head}", chosen_lr)
    train_seconds = time.perf_counter() - t0
    model, up = best.modules["model"], best.modules["upstream"]
    fit["epochs"] = round(fit["steps_total"] / max(len(batches), 1), 2)
    valid_acc, _ = run_split(up, model, "valid")
    test_acc, _, correct, total = run_split(up, model, "test", per_example=True)
    upstream.load_state_dict(up.state_dict())
    upstream.eval()
    return ProbeResult(valid_acc=valid_acc, test_acc=test_acc, train_seconds=train_seconds,
                       train_examples=len(train), weights=_weights_of(model), history=history, fit=fit,
                       test_correct=correct, test_total=total, precision=precision)


# ------------------------------------------------------------------------------ the record


def probe_key(upstream_name: str, cfg: ProbeConfig) -> str:
    """Identity of a probe in ``results.jsonl`` (what a resumed sweep skips)."""
    c = cfg.to_dict()
    parts = [upstream_name, cfg.task, cfg.head, str(cfg.layer_value), cfg.mode,
             f"{cfg.label_fraction:g}", str(cfg.seed)]
    # Other settings only when changed from the defaults, so keys stay readable.
    default = ProbeConfig().to_dict()
    extra = [f"{k}={c[k]}" for k in sorted(c) if k not in ("task", "head", "layer", "finetune", "label_fraction",
                                                              "seed", "precision") and c[k] != default[k]]
    return "|".join(parts + extra)


def make_record(upstream_info: dict[str, Any], cfg: ProbeConfig, result: ProbeResult, num_classes: int,
                cache_path: str | None, extract_precision: str | None = None) -> dict[str, Any]:
    """The JSON record appended to ``results.jsonl`` (documented in :mod:`aviary.evaluate.results`).

    Besides the accuracies: how the probe was fitted (``solver`` ``lbfgs`` / ``adam``;
    ``iterations``, ``converged``, ``grad_norm``, ``l2`` and ``l2_path`` for L-BFGS; ``lr``
    (the one used, ``lr_auto``, ``lr_trials``, ``lr_source``: the key of the sweep's probe
    whose trials chose it under ``lr_per="sweep"``), ``steps``, ``steps_run``, ``best_step`` for
    AdamW) and ``test_ci``, the 95 % bootstrap interval of ``test_acc`` over test utterances.
    """
    fit = result.fit
    lo, hi = bootstrap_interval(result.test_correct, result.test_total, replicates=cfg.bootstrap,
                                level=DEFAULT_LEVEL, seed=cfg.seed)
    rec: dict[str, Any] = {
        "key": probe_key(upstream_info["name"], cfg),
        "upstream": upstream_info["name"],
        "upstream_params": int(upstream_info["params"]),
        "upstream_kind": upstream_info.get("kind"),
        "num_hidden_states": int(upstream_info["num_hidden_states"]),
        "task": cfg.task,
        "head": cfg.head,
        "hidden": cfg.hidden if cfg.head != "linear" else None,
        "layer": cfg.layer_value,
        "mode": cfg.mode,
        "label_fraction": cfg.label_fraction,
        "seed": cfg.seed,
        "valid_acc": round(result.valid_acc, 6),
        "test_acc": round(result.test_acc, 6),
        "test_ci": [round(lo, 6), round(hi, 6)],
        "test_ci_level": DEFAULT_LEVEL,
        "test_utterances": int((result.test_total > 0).sum()),
        "train_seconds": round(result.train_seconds, 3),
        # Epoch-based keys of older records: no epochs any more (steps / solver iterations).
        "best_epoch": None,
        "epochs": fit.get("epochs"),
        "train_examples": result.train_examples,
        "num_classes": num_classes,
        "solver": fit["solver"],
        "lr": fit["lr"],
        "lr_auto": fit["lr_auto"],
        "lr_trials": fit["lr_trials"],
        "lr_source": fit.get("lr_source"),
        "steps": fit["steps"],
        "steps_run": fit["steps_run"],
        "best_step": fit["best_step"],
        "l2": fit["l2"],
        "l2_path": fit.get("l2_path"),
        "iterations": fit["iterations"],
        "iterations_total": fit.get("iterations_total"),
        "converged": fit["converged"],
        "grad_norm": fit.get("grad_norm"),
        "upstream_lr": cfg.upstream_lr if cfg.finetune else None,
        "layer_norm": cfg.layer_norm if cfg.layer_value == "weighted" else None,
        "weights": [round(w, 6) for w in result.weights] if result.weights is not None else None,
        "valid_history": [round(a, 6) for a in result.history],
        "cache": cache_path,
        # Resolved precision of the probe (head; fine-tuning: upstream too), the requested one,
        # and that of the cached features' extraction (frozen; None for old caches).
        "precision": result.precision,
        "precision_requested": cfg.precision,
        "extract_precision": extract_precision,
        "config": cfg.to_dict(),
    }
    return rec


def prepare_splits(cfg: ProbeConfig, splits: dict[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Cut the training split to the label fraction (seeded by the probe's seed)."""
    out = {k: list(v) for k, v in splits.items()}
    out["train"] = label_fraction_subset(out["train"], cfg.label_fraction, cfg.seed)
    return out


def run_probe(cfg: ProbeConfig, splits: dict[str, Sequence[Any]], *, cache: FeatureCache | None = None,
              upstream: nn.Module | None = None, upstream_info: dict[str, Any] | None = None,
              progress: Any = None, chosen_lr: ChosenLR | None = None) -> dict[str, Any]:
    """Run one probe and return its result record (not written anywhere).

    Args:
        cfg: the probe.
        splits: full train / valid / test utterances of the task (the label fraction is applied here).
        cache: the feature cache (frozen mode).
        upstream: the upstream (fine-tune mode; modified in place).
        upstream_info: :func:`describe_upstream` dict; defaults to the cache's.
        progress: optional tqdm bar.
        chosen_lr: with ``lr_per="sweep"`` and lr auto, the learning rate the sweep's first
            probe of this group chose (no trials here); ignored by solved and fixed-lr probes.

    Returns:
        The record (see :func:`make_record`).
    """
    parts = prepare_splits(cfg, splits)
    classes = class_names(cfg.task, splits)
    if cfg.finetune:
        if upstream is None:
            raise ValueError("fine-tuning needs the upstream (pass upstream=...)")
        if upstream_info is None:
            raise ValueError("fine-tuning needs upstream_info (describe_upstream(...).to_dict())")
        result = train_finetune(cfg, upstream, parts, progress, chosen_lr)
        return make_record(upstream_info, cfg, result, len(classes), None)
    if cache is None:
        raise ValueError("frozen probing needs a feature cache (aviary extract)")
    result = train_frozen(cfg, cache, parts, progress, chosen_lr)
    return make_record(upstream_info or cache.upstream, cfg, result, len(classes), str(cache.path),
                       cache.precision)
