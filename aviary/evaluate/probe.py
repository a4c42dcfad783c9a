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

Both use cross-entropy, Adam(W), accuracy on valid after every epoch, keep the best
epoch's weights (early model selection with patience) and report test accuracy at that
epoch. Seeds fix head initialisation and data order.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from aviary.config import Config, ConfigError, check, check_choice, check_range
from aviary.evaluate.cache import FeatureCache, batches_by_duration, load_waveforms
from aviary.evaluate.featurizers import WeightedSum, build_featurizer, layer_index, parse_layer_spec
from aviary.evaluate.heads import DEFAULT_HIDDEN, HEADS, build_head
from aviary.evaluate.tasks import (IGNORE_INDEX, class_names, get_task, label_fraction_subset,
                                   phone_frame_labels, utterance_label)
from aviary.precision import PRECISIONS, autocast_context, from_legacy_autocast, resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig(Config):
    """One probe's settings (saved in every result record).

    ``layer`` is a string so the config stays plain JSON: ``"3"``, ``"last"`` or ``"weighted"``.
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
    lr: float = 1e-3  # head (and weighted-sum weights)
    upstream_lr: float = 5e-5  # fine-tuning only: the pretrained weights move more slowly
    weight_decay: float = 0.0
    max_epochs: int = 30
    patience: int = 4  # epochs without a better valid accuracy before stopping
    # Frozen frame-level: frames per step (whole utterances). Small enough for many steps per
    # epoch (so early stopping triggers after a few epochs), large enough to amortise overhead.
    batch_frames: int = 4096
    batch_utterances: int = 64  # frozen utterance-level: utterances per step
    batch_seconds: float = 40.0  # fine-tuning: padded audio seconds per step
    # Head (frozen) / upstream + head (fine-tune) matmuls: auto = bf16 where native
    # (aviary.precision). Not part of the probe's key: it says how, not what, was measured.
    precision: str = "auto"

    def validate(self) -> None:
        check_choice("head", self.head, HEADS)
        check_choice("precision", self.precision, PRECISIONS)
        try:
            parse_layer_spec(self.layer)
        except ValueError as e:
            check(False, "layer", self.layer, f"an integer >= 0, 'last' or 'weighted' ({e})")
        check_range("hidden", self.hidden, 1, None)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("label_fraction", self.label_fraction, 0.0, 1.0, lo_open=True)
        check_range("lr", self.lr, 0.0, None, lo_open=True)
        check_range("upstream_lr", self.upstream_lr, 0.0, None, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("max_epochs", self.max_epochs, 1, None)
        check_range("patience", self.patience, 1, None)
        check_range("batch_frames", self.batch_frames, 1, None)
        check_range("batch_utterances", self.batch_utterances, 1, None)
        check_range("batch_seconds", self.batch_seconds, 0.0, None, lo_open=True)

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
    """Outcome of :func:`train_probe`."""

    valid_acc: float
    test_acc: float
    best_epoch: int
    epochs: int
    train_seconds: float
    train_examples: int
    weights: list[float] | None
    history: list[float]
    precision: str = "fp32"  # resolved precision of the training / evaluation matmuls


class ProbeModel(nn.Module):
    """Featurizer -> (mean pooling for utterance tasks) -> head.

    Args:
        featurizer: ``(..., N, H) -> (..., H)``.
        head: ``(..., H) -> (..., C)``.
    """

    def __init__(self, featurizer: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.head = head

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        # stacked: (..., N, H) -> logits (..., C)
        return self.head(self.featurizer(stacked))


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
                num_classes: int, layer_norm_in_featurizer: bool) -> ProbeModel:
    feat = build_featurizer(cfg.layer_value, num_hidden_states, layer_norm=layer_norm_in_featurizer,
                            stacked_indices=stacked)
    head = build_head(cfg.head, hidden_size, num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    return ProbeModel(feat, head)


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


class _PooledData:
    """Utterance-level examples: per-layer mean over valid frames, computed once."""

    def __init__(self, cache: FeatureCache, utts: Sequence[Any], layers: list[int], labels: list[int],
                 layer_norm: bool) -> None:
        pooled = np.zeros((len(utts), len(layers), cache.hidden_size), dtype=np.float32)
        for i, u in enumerate(utts):
            x = torch.from_numpy(cache.get_stacked(str(u.id), layers))  # (T, N, H)
            if layer_norm:
                # Per-frame layer norm must come before pooling (it is not linear).
                x = F.layer_norm(x, x.shape[-1:])
            pooled[i] = x.mean(dim=0).numpy()
        self.x = torch.from_numpy(pooled)  # (U, N, H)
        self.y = torch.tensor(labels, dtype=torch.long)  # (U,)
        self.num_examples = len(utts)

    def batches(self, batch: int, rng: np.random.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.arange(len(self.y)) if rng is None else torch.from_numpy(rng.permutation(len(self.y)))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            yield self.x[idx], self.y[idx]


def _evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
              precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the labelled examples of the batches."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for x, y in batches:
            with autocast_context(precision, x.device):
                logits = model(x.float()).float()
            valid = y != IGNORE_INDEX
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum", ignore_index=IGNORE_INDEX))
            correct += int(((logits.argmax(-1) == y) & valid).sum())
            total += int(valid.sum())
    return correct / max(total, 1), loss_sum / max(total, 1)


def train_frozen(cfg: ProbeConfig, cache: FeatureCache, splits: dict[str, Sequence[Any]],
                 progress: Any = None) -> ProbeResult:
    """Train and evaluate a probe from a feature cache.

    Args:
        cfg: the probe.
        cache: an opened :class:`FeatureCache` holding every utterance of ``splits``.
        splits: ``{"train", "valid", "test"}`` utterances (train already cut to the label fraction).
        progress: optional tqdm bar whose postfix shows the epoch.

    Returns:
        :class:`ProbeResult`.
    """
    spec = get_task(cfg.task)
    nhs = cache.num_hidden_states
    layers = _stacked_layers(cfg, nhs, cache.layers)
    classes = class_names(cfg.task, splits)
    precision = resolve_precision(cfg.precision, "cpu")  # cached features live on the CPU
    _seed_all(cfg.seed)
    if spec.level == "frame":
        data = {k: _FrameData(cache, v, layers) for k, v in splits.items()}
        n_train = data["train"].num_frames
        batch = cfg.batch_frames
        model = _make_model(cfg, nhs, layers, cache.hidden_size, len(classes), cfg.layer_norm)
    else:
        cid = {c: i for i, c in enumerate(classes)}
        data = {k: _PooledData(cache, v, layers, [utterance_label(cfg.task, u, cid) for u in v], cfg.layer_norm)
                for k, v in splits.items()}
        n_train = data["train"].num_examples
        batch = cfg.batch_utterances
        # Layer norm already applied per frame before pooling.
        model = _make_model(cfg, nhs, layers, cache.hidden_size, len(classes), False)
    if n_train == 0:
        raise ValueError(f"task {cfg.task}: no labelled training examples")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = _EarlyStopper({"model": model}, cfg.patience)
    history = []
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(cfg.max_epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        for x, y in data["train"].batches(batch, rng):
            if not bool((y != IGNORE_INDEX).any()):
                continue  # a batch of unaligned frames only: nothing to learn, and a NaN loss
            with autocast_context(precision, x.device):
                logits = model(x.float()).float()
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc, vloss = _evaluate(model, data["valid"].batches(batch, None), precision)
        history.append(acc)
        if progress is not None:
            progress.set_postfix_str(f"{cfg.task}/{cfg.head}/L{cfg.layer} ep{epoch} valid {acc:.3f}")
        if stopper.update(acc, vloss, epoch):
            break
    train_seconds = time.perf_counter() - t0
    stopper.restore()
    test, _ = _evaluate(model, data["test"].batches(batch, None), precision)
    return ProbeResult(valid_acc=stopper.best, test_acc=test, best_epoch=stopper.best_epoch, epochs=epoch + 1,
                       train_seconds=train_seconds, train_examples=n_train, weights=_weights_of(model),
                       history=history, precision=precision)


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
        mask = (torch.arange(feats.shape[1], device=device)[None, :] < lengths[:, None]).to(feats.dtype)
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
                   progress: Any = None) -> ProbeResult:
    """Train upstream + probe together on raw audio (the upstream is modified in place).

    Args:
        cfg: the probe (``finetune=True``).
        upstream: the :class:`~aviary.models.upstream.Upstream` to fine-tune.
        splits: train (already cut to the label fraction), valid and test utterances.
        progress: optional tqdm bar for the postfix.

    Returns:
        :class:`ProbeResult`; the upstream ends with the best valid epoch's weights.
    """
    spec = get_task(cfg.task)
    nhs = int(upstream.num_hidden_states)
    stacked = _stacked_layers(cfg, nhs, list(range(nhs)))
    classes = class_names(cfg.task, splits)
    cid = {c: i for i, c in enumerate(classes)}
    device = next(iter(upstream.parameters())).device
    precision = resolve_precision(cfg.precision, device)
    _seed_all(cfg.seed)
    model = _make_model(cfg, nhs, stacked, int(upstream.hidden_size), len(classes), cfg.layer_norm).to(device)
    up_params = [p for p in upstream.parameters() if p.requires_grad]
    if not up_params:
        raise ValueError("fine-tuning needs an upstream with trainable parameters "
                         "(feature baselines such as fbank have none; probe them frozen)")
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.lr},
                             {"params": up_params, "lr": cfg.upstream_lr}], weight_decay=cfg.weight_decay)
    stopper = _EarlyStopper({"model": model, "upstream": upstream}, cfg.patience)
    durs = {k: [float(u.duration) for u in v] for k, v in splits.items()}
    frame_shift = float(upstream.frame_shift)

    def evaluate(split: str) -> tuple[float, float]:
        upstream.eval()
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        utts = splits[split]
        order = sorted(range(len(utts)), key=lambda i: durs[split][i])
        with torch.no_grad():
            for b in batches_by_duration(order, durs[split], cfg.batch_seconds):
                bu = [utts[i] for i in b]
                logits, lengths = _finetune_logits(upstream, model, bu, stacked, spec.level, device, precision)
                y = _finetune_targets(bu, spec.level, lengths.cpu(), logits.shape[1] if spec.level == "frame" else 0,
                                      frame_shift, cfg.task, cid).to(device)
                valid = y != IGNORE_INDEX
                loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="sum"))
                correct += int(((logits.argmax(-1) == y) & valid).sum())
                total += int(valid.sum())
        return correct / max(total, 1), loss_sum / max(total, 1)

    n_train = len(splits["train"])
    history = []
    t0 = time.perf_counter()
    epoch = 0
    train = splits["train"]
    order = sorted(range(len(train)), key=lambda i: durs["train"][i])
    batches = batches_by_duration(order, durs["train"], cfg.batch_seconds)
    for epoch in range(cfg.max_epochs):
        upstream.train()
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        for bi in rng.permutation(len(batches)):
            bu = [train[i] for i in batches[bi]]
            logits, lengths = _finetune_logits(upstream, model, bu, stacked, spec.level, device, precision)
            y = _finetune_targets(bu, spec.level, lengths.cpu(), logits.shape[1] if spec.level == "frame" else 0,
                                  frame_shift, cfg.task, cid).to(device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {float(loss)} at epoch {epoch}; lower --lr / --upstream-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc, vloss = evaluate("valid")
        history.append(acc)
        if progress is not None:
            progress.set_postfix_str(f"finetune {cfg.task}/{cfg.head} ep{epoch} valid {acc:.3f}")
        if stopper.update(acc, vloss, epoch):
            break
    train_seconds = time.perf_counter() - t0
    stopper.restore()
    test, _ = evaluate("test")
    upstream.eval()
    return ProbeResult(valid_acc=stopper.best, test_acc=test, best_epoch=stopper.best_epoch, epochs=epoch + 1,
                       train_seconds=train_seconds, train_examples=n_train, weights=_weights_of(model),
                       history=history, precision=precision)


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
    """The JSON record appended to ``results.jsonl`` (documented in :mod:`aviary.evaluate.results`)."""
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
        "train_seconds": round(result.train_seconds, 3),
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "train_examples": result.train_examples,
        "num_classes": num_classes,
        "lr": cfg.lr,
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
              progress: Any = None) -> dict[str, Any]:
    """Run one probe and return its result record (not written anywhere).

    Args:
        cfg: the probe.
        splits: full train / valid / test utterances of the task (the label fraction is applied here).
        cache: the feature cache (frozen mode).
        upstream: the upstream (fine-tune mode; modified in place).
        upstream_info: :func:`describe_upstream` dict; defaults to the cache's.
        progress: optional tqdm bar.

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
        result = train_finetune(cfg, upstream, parts, progress)
        return make_record(upstream_info, cfg, result, len(classes), None)
    if cache is None:
        raise ValueError("frozen probing needs a feature cache (aviary extract)")
    result = train_frozen(cfg, cache, parts, progress)
    return make_record(upstream_info or cache.upstream, cfg, result, len(classes), str(cache.path),
                       cache.precision)
