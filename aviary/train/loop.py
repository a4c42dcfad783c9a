"""The pretraining loop: one explicit loop for every model family.

``pretrain(model_cfg, train_cfg, data, run_dir)`` builds the family's pretraining model,
then repeats: take ``grad_accum`` micro-batches, forward under autocast, backward, check
that loss and gradient are finite, clip, AdamW step at the scheduled learning rate. Every
``log_every`` steps it writes metrics, every ``val_every`` steps a validation loss, every
``checkpoint_every`` steps a checkpoint (and at the end, and on SIGINT / SIGTERM).

Exact resume: everything random about micro-batch ``g`` (crops, masks, dropout) is drawn
from ``(seed, g)`` (see :mod:`aviary.train.data`), the learning rate is a function of the
step, and the checkpoint holds the weights, the optimizer moments and the stream position.
A run killed and resumed from a checkpoint therefore ends with exactly the weights of an
uninterrupted run (bitwise on CPU; tested in ``tests/train/test_resume.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from aviary.config import Config, ConfigError
from aviary.models.registry import get_family
from aviary import storage
from aviary.data.manifest import manifest_fingerprint, split_file_paths
from aviary.precision import autocast_dtype, resolve_precision
from aviary.train.compile import compile_model
from aviary.train import checkpoint as ckpt
from aviary.train.config import TrainConfig
from aviary.train.data import (Collate, ItemDataset, MicroBatchStream, StreamPosition, TrainData,
                               build_train_data, mix_seed)
from aviary.train.distributed import (DistInfo, all_reduce_sum, barrier, cleanup_distributed,
                                      init_distributed)
from aviary.train.schedule import linear_warmup_decay

log = logging.getLogger(__name__)

#: Seed stream id of validation batches, kept apart from the training stream's.
_VALID_STREAM = 0x7A11D


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or the run's
    final weights or validation loss are non-finite."""


class UnusableDataError(RuntimeError):
    """Too few of the files a run read could be used (``train.min_usable_fraction``)."""


#: Items read before the usable fraction is judged (all of them for a smaller split).
_USABLE_MIN_ITEMS = 64


def usable_fraction_error(split: str, read: int, dropped: int, total: int, min_fraction: float,
                          first: list[str]) -> str | None:
    """The message for a split whose usable share is below ``min_fraction``, else ``None``.

    Judged once ``min(total, 64)`` items were read, so that a few broken files in the first
    batch of a large corpus do not stop it.
    """
    if read == 0 or read < min(total, _USABLE_MIN_ITEMS):
        return None
    usable = read - dropped
    if usable / read >= min_fraction and usable > 0:
        return None
    listed = "; ".join(first[:3]) + (" ..." if len(first) > 3 else "")
    return (f"only {usable} of the {read} {split} files read so far were usable ({dropped} skipped; "
            f"train.min_usable_fraction={min_fraction:g}); first unusable: {listed}. Run "
            "`aviary check-data` on the corpus (stale durations in the manifest make files unusable "
            "too) and fix or remove the broken files")


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf."""
    return [k for k, v in tensors.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


@dataclass
class PretrainResult:
    """What :func:`pretrain` did."""

    run_dir: Path
    step: int                       # optimizer steps done (including skipped ones)
    interrupted: bool = False       # stopped early by SIGINT / SIGTERM (checkpoint written)
    train_loss: float = math.nan    # mean loss of the last logging window
    valid_loss: float | None = None  # last validation loss
    nonfinite_steps: int = 0        # steps skipped for a non-finite loss / gradient
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None   # the trained pretraining model (not DDP-wrapped)


# Device, precision


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` if a GPU is visible, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {name!r} is invalid: no CUDA device is available")
    return torch.device(name)


# Optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only.

    Biases, LayerNorm / GroupNorm weights and other vectors get no decay (BERT, s3prl);
    a model may name more (position embeddings, mask tokens) with ``no_weight_decay()``.
    Parameters shared between modules (ALBERT) appear once.
    """
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() de-duplicates shared tensors
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in extra else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# Signals


class StopFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": give up on the checkpoint.
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: finishing this step, writing a checkpoint, then stopping",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# Run directory


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step``: a resumed run re-does those steps and logs them again."""
    if not path.is_file():
        return
    keep: list[str] = []
    # From step 0 (no checkpoint yet) nothing of a killed run survives, not even its step-0
    # validation line, which the new start writes again.
    for line in path.read_text(encoding="utf-8").splitlines() if step > 0 else []:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    storage.write_bytes_atomic(path, ("\n".join(keep) + "\n" if keep else "").encode())


class MetricsWriter:
    """``metrics.jsonl`` (always) and TensorBoard (when importable), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        _trim_metrics(self.path, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                # purge_step drops events a killed run logged after its last checkpoint.
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# Validation


@torch.no_grad()
def validation_loss(model: nn.Module, data: TrainData, cfg: TrainConfig, device: torch.device,
                    amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Mean loss (and metrics) over the first ``val_batches`` batches of ``data``.

    The same batches, crops and masks every time (seeded from ``cfg.seed`` alone), so
    successive values differ only because the weights do.
    """
    was_training = model.training
    model.eval()
    batches = data.epoch_batches(0, mix_seed(cfg.seed, _VALID_STREAM))
    if cfg.val_batches:
        batches = batches[: cfg.val_batches]
    sums: dict[str, float] = {}
    n = 0
    read, dropped = 0, []
    for j, idx in enumerate(batches):
        items = [data.load_item(i, mix_seed(cfg.seed, _VALID_STREAM, j, k)) for k, i in enumerate(idx)]
        read += len(items)
        dropped += [i for i, it in zip(idx, items) if it is None]
        items = [it for it in items if it is not None]
        if not items:
            continue
        batch = _to_device(data.collate(items), device)
        torch.manual_seed(mix_seed(cfg.seed, _VALID_STREAM, j))
        with _autocast(device, amp_dtype):
            out = model(batch)
        for k, v in {"loss": out.loss, **out.metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train(was_training)
    err = usable_fraction_error("valid", read, len(dropped), read, cfg.min_usable_fraction,
                                [data.item_name(i) for i in dropped[:4]])
    if err:
        raise UnusableDataError(err)
    return {k: v / n for k, v in sums.items()} if n else {}


# Helpers


def _bundle_holds(run_dir: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``RUN_DIR/model.safetensors`` is readable and holds exactly ``tensors``
    (compared by the checksum stored in its metadata, so the weights are not reread)."""
    from safetensors import safe_open

    path = Path(run_dir) / ckpt.MODEL_FILE
    if not path.is_file():
        return False
    try:
        # safe_open checks the header against the file's size: a truncated bundle is rewritten.
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("aviary.sha256")
    except Exception:  # unreadable or truncated: rewrite it
        return False
    return stored == storage.tensors_checksum({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _prepare_run_dir(run_dir: Path, resume: bool, model_cfg: Config, train_cfg: TrainConfig,
                     data_desc: str, info: DistInfo, precision: str) -> None:
    """Refuse to overwrite a run by accident; write ``run.json`` (rank 0)."""
    data_sha256 = manifest_fingerprint(data_desc) if data_desc else None
    existing = ckpt.list_checkpoints(run_dir)
    if existing and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints (newest step {existing[0][0]}); "
                          "pass --resume to continue that run or choose another --out")
    run_json = run_dir / "run.json"
    if resume and not run_json.is_file() and existing:
        # run.json is gone: the newest checkpoint's header says what the run is. Comparing
        # here, before run.json is rewritten, keeps a wrong --model from replacing the record
        # (after which the right command would be refused).
        found = ckpt.stored_run_config(run_dir)
        if found is not None and found[1].get("model") != model_cfg.to_dict():
            theirs = found[1].get("model") or {}
            diff = sorted(k for k in set(theirs) | set(model_cfg.to_dict())
                          if theirs.get(k) != model_cfg.to_dict().get(k))
            raise ConfigError(f"{found[0]}: --resume with a different model config than this "
                              f"checkpoint's (keys {diff}; {run_json} is missing); resume with the "
                              "model the run was started with")
    if resume and run_json.is_file():
        stored = storage.read_json(run_json)
        if stored.get("data") and data_desc and not _same_data(stored["data"], data_desc,
                                                               stored.get("data_sha256"), data_sha256):
            raise ConfigError(f"{run_json}: the run was trained on {stored['data']!r}, --resume was given "
                              f"--data {data_desc!r}; resume on the same corpus (or omit --data), or start "
                              "a new run in another --out")
        if stored.get("model") != model_cfg.to_dict():
            diff = sorted(k for k in set(stored.get("model", {})) | set(model_cfg.to_dict())
                          if stored.get("model", {}).get(k) != model_cfg.to_dict().get(k))
            raise ConfigError(f"{run_json}: --resume with a different model config "
                              f"(keys {diff}); resume with the same --model/overrides")
        changed = sorted(k for k, v in train_cfg.to_dict().items() if stored.get("train", {}).get(k) != v)
        if changed:
            log.warning("resuming with changed train config keys %s; the result will differ "
                        "from an uninterrupted run", changed)
    if info.is_main:
        storage.write_json_atomic(run_json, {
            "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "data": data_desc,
            "data_sha256": data_sha256,
            "world_size": info.world_size, "git_commit": _git_commit(),
            # train.precision is the request (auto ...); this is what this machine runs.
            "precision": precision, "precision_requested": train_cfg.precision,
            "format_version": storage.FORMAT_VERSION,
        })


def _same_data(a: str, b: str, a_sha256: str | None = None, b_sha256: str | None = None) -> bool:
    """The same corpus: the same string, the same path once resolved, or (a moved corpus) the
    same :func:`aviary.data.manifest.manifest_fingerprint` at another path."""
    if a == b:
        return True
    if a_sha256 and b_sha256 and a_sha256 == b_sha256:
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _save(run_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
          scaler: Any, model_cfg: Config, train_cfg: TrainConfig, stream: StreamPosition,
          counters: dict[str, int], info: DistInfo) -> None:
    """Checkpoint + root bundle (rank 0). A failure raises CheckpointError naming the cause."""
    if not info.is_main:
        return
    tensors = _unwrap(model).state_dict()
    bad = nonfinite_tensors(tensors)
    if bad:
        # A checkpoint or bundle of NaN weights would load and give NaN features, silently.
        raise NonFiniteError(f"step {step}: {len(bad)} weight tensors are non-finite (first: {bad[0]}); "
                             "nothing written. Lower train.lr or use fp32.")
    config = storage.checkpoint_config(model_cfg, train_cfg, step)
    opt_tensors, opt_json = ckpt.optimizer_to_tensors(opt.state_dict())
    state = {"step": step, "epoch": stream.epoch, "position": stream.position, "g": stream.g,
             "world_size": info.world_size, "optimizer": opt_json, "counters": counters,
             "scaler": scaler.state_dict() if scaler is not None else None}
    d = ckpt.save_checkpoint(run_dir, step, tensors, config, opt_tensors, state,
                             keep_last=train_cfg.keep_last)
    # The root bundle is what `aviary.load(RUN_DIR)` reads first: only weights whose last step
    # was finite go there (the weights after a blow-up are finite but huge; their features NaN).
    if counters["nonfinite_in_a_row"]:
        log.warning("step %d: %d non-finite steps in a row; checkpoint written, root bundle left as it was",
                    step, counters["nonfinite_in_a_row"])
    else:
        storage.save_tensors(run_dir / ckpt.MODEL_FILE, tensors, config=config)
    log.info("checkpoint %s", d)


# The loop


def pretrain(model_cfg: Config, train_cfg: TrainConfig, data: str | os.PathLike | None,
             run_dir: str | os.PathLike, resume: bool = False,
             train_data: TrainData | None = None, valid_data: TrainData | None = None,
             compile: bool = False) -> PretrainResult:
    """Pretrain a model; checkpoints, metrics and the final weights go to ``run_dir``.

    Args:
        model_cfg: the family's pretraining config (``model_cfg.family`` picks the family).
        train_cfg: optimisation / batching / checkpointing settings.
        data: corpus directory or manifest file (its ``train`` split is used when it has
            one, and its ``valid`` split for validation), or ``None`` with ``train_data``.
        run_dir: output directory (see DEVELOPING.md for its layout).
        resume: continue from the newest good checkpoint of ``run_dir`` (a run without one
            starts from scratch).
        train_data, valid_data: ready-made :class:`TrainData` instead of ``data``.
        compile: ``torch.compile`` the model's transformer blocks in place
            (:mod:`aviary.train.compile`; checkpoints are the same as without).

    Returns:
        A :class:`PretrainResult`.

    Raises:
        ConfigError: bad settings or data (before any training).
        CheckpointError: a checkpoint could not be written (disk full), or none is usable.
        NonFiniteError: ``max_nonfinite_steps`` non-finite steps in a row.
    """
    cfg = train_cfg
    run_dir = Path(run_dir)
    family = get_family(model_cfg.family)
    probe_device = resolve_device(cfg.device, DistInfo())
    info = init_distributed(probe_device.type)
    try:
        device = resolve_device(cfg.device, info)
        precision = resolve_precision(cfg.precision, device, loss_scaling=True)
        amp_dtype, use_scaler = autocast_dtype(precision), precision == "fp16"
        log.info("precision %s (requested %s, device %s)", precision, cfg.precision, device)

        # Data first: a missing corpus should fail before a model is built.
        if train_data is None:
            if data is None:
                raise ConfigError("no training data: pass a corpus directory or manifest")
            train_data, valid_data = _open_splits(family.batch_kind, data, cfg, model_cfg)
        if len(train_data) == 0:
            raise ConfigError(f"{data}: the training split is empty")
        if hasattr(train_data, "configure_model"):
            # Token corpora fix settings of the model (vocabulary size) themselves.
            model_cfg = train_data.configure_model(model_cfg)
        if family.fit_corpus_stats is not None and cfg.corpus_stats_utterances > 0:
            # Deterministic (same items, same order, float64 sums), so every DDP rank and a
            # resumed run arrive at the same config.
            model_cfg = family.fit_corpus_stats(model_cfg, _stat_batches(train_data, cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        _prepare_run_dir(run_dir, resume, model_cfg, cfg, None if data is None else str(data), info, precision)
        barrier(info)

        # Same initial weights on every rank and in every run of this seed.
        torch.manual_seed(cfg.seed)
        model = family.build_pretrain(model_cfg).to(device)
        model.train()
        # Under autocast, fused AdamW: one kernel over all parameters (CPU: 6.7 vs 22.9 ms per step
        # for mockingjay-cpu). fp32 keeps the for-loop one, bitwise the same as before (it rounds
        # differently by ~1e-9, and fp32 runs are compared exactly: tests/train/test_loop_steps.py).
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                fused=amp_dtype is not None and device.type in ("cpu", "cuda"))
        scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        start = StreamPosition()
        counters = {"nonfinite_steps": 0, "nonfinite_in_a_row": 0, "skipped_items": 0,
                    "read_items": 0}
        step = 0
        found = None
        if resume:
            found = ckpt.latest_good_checkpoint(run_dir)
            if found is not None:
                d, (m_tensors, m_config, t_tensors, state) = found
                model.load_state_dict(m_tensors, strict=True)
                opt.load_state_dict(ckpt.optimizer_from_tensors(t_tensors, state["optimizer"]))
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
                step = int(state["step"])
                start = StreamPosition(state["epoch"], state["position"], state["g"])
                counters.update(state.get("counters", {}))
                if state.get("world_size", 1) != info.world_size:
                    log.warning("resuming a %d-process run on %d processes: batches per step "
                                "change", state.get("world_size", 1), info.world_size)
                log.info("resuming from %s (step %d)", d, step)
            else:
                log.info("--resume: %s has no checkpoint yet, starting from scratch", run_dir)
        if step >= cfg.steps:
            log.info("%s is already at step %d of %d", run_dir, step, cfg.steps)
            if found is not None and (counters["nonfinite_in_a_row"] or nonfinite_tensors(m_tensors)):
                raise NonFiniteError(f"{found[0]}: the run ended with {counters['nonfinite_in_a_row']} "
                                     "non-finite steps in a row (or non-finite weights); no bundle is "
                                     "written from it. Start a new run with a lower train.lr.")
            if resume and found is not None and info.is_main and not _bundle_holds(run_dir, m_tensors):
                # A run killed between its last checkpoint and the root bundle left an older
                # bundle behind: the bundle must hold the final weights. (An intact bundle is
                # left alone, so resuming a finished run writes nothing.)
                log.info("%s: the root bundle is missing or older than the last checkpoint; rewriting it", run_dir)
                storage.save_tensors(run_dir / ckpt.MODEL_FILE, m_tensors, config=m_config)
            return PretrainResult(run_dir, step, nonfinite_steps=counters["nonfinite_steps"], model=model)

        compile_model(model, compile)
        if info.enabled:
            ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            model = nn.parallel.DistributedDataParallel(model, **ddp_kw)
        return _train(model, opt, scaler, model_cfg, cfg, train_data, valid_data, run_dir,
                      device, amp_dtype, info, step, start, counters)
    finally:
        cleanup_distributed(info)


def _stat_batches(train_data: TrainData, cfg: TrainConfig, batch_size: int = 8):
    """(wavs, lengths) batches of the first ``corpus_stats_utterances`` usable training items."""
    n = min(len(train_data), cfg.corpus_stats_utterances)
    log.info("measuring corpus statistics on %d training utterances", n)
    for start in range(0, n, batch_size):
        items = [it for i in range(start, min(n, start + batch_size))
                 if (it := train_data.load_item(i, cfg.seed + i)) is not None]
        if items:
            batch = train_data.collate(items)
            yield batch["wavs"], batch["wav_lengths"]


def _open_splits(batch_kind: str, data: str | os.PathLike, cfg: TrainConfig, model_cfg: Config
                 ) -> tuple[TrainData, TrainData | None]:
    """``train`` / ``valid`` splits of a corpus directory, or a single manifest (no validation)."""
    p = Path(data)
    splits = split_file_paths(p)
    if "train" not in splits:
        if p.is_dir():
            return build_train_data(batch_kind, p, None, cfg, model_cfg), None
        log.info("%s has no train/valid split: training on all of it, no validation", p)
        return build_train_data(batch_kind, p, None, cfg, model_cfg), None
    train = build_train_data(batch_kind, p, "train", cfg, model_cfg)
    valid = build_train_data(batch_kind, p, "valid", cfg, model_cfg) if "valid" in splits else None
    return train, valid


def _train(model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, model_cfg: Config,
           cfg: TrainConfig, train_data: TrainData, valid_data: TrainData | None, run_dir: Path,
           device: torch.device, amp_dtype: torch.dtype | None, info: DistInfo, step: int,
           start: StreamPosition, counters: dict[str, int]) -> PretrainResult:
    """Train from ``step`` (the stream at ``start``) to ``cfg.steps``; see :class:`_Trainer`."""
    trainer = _Trainer(model, opt, scaler, model_cfg, cfg, train_data, valid_data, run_dir, device,
                       amp_dtype, info, step, start, counters)
    return trainer.run()


@dataclass
class _StepLosses:
    """What the micro-batches of one optimizer step gave."""

    loss: float = 0.0             # mean over micro-batches of the loss
    finite: bool = True           # every micro-batch's loss was finite (this rank)
    metrics: dict[str, float] = field(default_factory=dict)  # means over micro-batches
    read: int = 0                 # items read (this rank)
    dropped: int = 0              # of which unusable
    used: int = 0                 # micro-batches with at least one usable item


@dataclass
class _Window:
    """Sums over the steps since the last metrics line (averaged when it is written)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    amount: float = 0.0           # data seen, in TrainData.unit (throughput)
    t0: float = field(default_factory=time.perf_counter)


class _Trainer:
    """One run of the loop, from ``step`` to ``cfg.steps``: set-up in ``__init__``, then
    :meth:`run` repeats *learning rate -> micro-batches -> optimizer step -> log -> validate
    -> stop or checkpoint*, and ends with :meth:`finish`."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any, model_cfg: Config,
                 cfg: TrainConfig, train_data: TrainData, valid_data: TrainData | None, run_dir: Path,
                 device: torch.device, amp_dtype: torch.dtype | None, info: DistInfo, step: int,
                 start: StreamPosition, counters: dict[str, int]) -> None:
        from tqdm.auto import tqdm

        self.model, self.core, self.opt, self.scaler = model, _unwrap(model), opt, scaler
        self.model_cfg, self.cfg, self.run_dir = model_cfg, cfg, run_dir
        self.train_data, self.valid_data = train_data, valid_data
        self.device, self.amp_dtype, self.info = device, amp_dtype, info
        self.step, self.counters = step, counters
        self.precision_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        self.params = [p for g in opt.param_groups for p in g["params"]]
        stream = MicroBatchStream(train_data, cfg.seed, start, info.rank, info.world_size)
        # The checkpointed position must be that of the step boundary, not of the DataLoader's
        # prefetching: a shadow stream of indices only is advanced as batches are consumed.
        self.shadow = MicroBatchStream(train_data, cfg.seed, start, info.rank, info.world_size)
        loader = torch.utils.data.DataLoader(
            ItemDataset(train_data), batch_sampler=stream, collate_fn=Collate(train_data),
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        self.batches = iter(loader)
        self.metrics = MetricsWriter(run_dir, info.is_main, cfg.tensorboard, step)
        self.bar = tqdm(total=cfg.steps, initial=step, disable=None if info.is_main else True,
                        dynamic_ncols=True, desc="pretrain")
        self.result = PretrainResult(run_dir, step)
        self.window = _Window()
        self.last_saved = step
        self.first_dropped: list[str] = []  # names of the first unusable files (this rank's)

    def run(self) -> PretrainResult:
        """The loop, top to bottom."""
        cfg = self.cfg
        try:
            if self.valid_data is not None and cfg.val_every and self.step == 0:
                # The untrained model's loss: the baseline a falling validation curve starts from.
                self.validate()
            with StopFlag() as stop:
                while self.step < cfg.steps:
                    lr = self.set_learning_rate()
                    losses = self.accumulate()
                    gnorm, finite = self.optimizer_step(losses)
                    self.log_step(losses, gnorm, finite, lr)
                    if (self.valid_data is not None and cfg.val_every and self.step % cfg.val_every == 0
                            and self.step < cfg.steps):
                        self.validate()
                    if self.stop_requested(stop):
                        break
                    if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                        self.checkpoint(self.step)
                if not self.result.interrupted:
                    self.finish()
        finally:
            self.bar.close()
            self.metrics.close()
            del self.batches  # shuts DataLoader workers down
        return self.summary()

    def set_learning_rate(self) -> float:
        """The scheduled learning rate of this step (and the model's own schedules); zero grads."""
        cfg = self.cfg
        lr = linear_warmup_decay(self.step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr * cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if hasattr(self.core, "set_progress"):
            self.core.set_progress(self.step, cfg.steps)
        self.opt.zero_grad(set_to_none=True)
        return lr

    def accumulate(self) -> _StepLosses:
        """Forward and backward ``grad_accum`` micro-batches; unusable items dropped and counted."""
        cfg, info = self.cfg, self.info
        out = _StepLosses()
        for micro in range(cfg.grad_accum):
            g, batch, dropped, n_read = next(self.batches)
            for _ in range(info.world_size):
                self.shadow.next_global()
            out.read += n_read
            out.dropped += len(dropped)
            if len(self.first_dropped) < 4:
                self.first_dropped += [self.train_data.item_name(i) for i in dropped[:4 - len(self.first_dropped)]]
            if batch is None:
                if info.enabled:
                    raise RuntimeError(f"micro-batch {g}: every file is unusable; run "
                                       "`aviary check-data` and remove the broken files")
                continue  # nothing usable in this micro-batch: no gradient from it
            out.used += 1
            self.window.amount += self.train_data.batch_amount(batch)
            self.backward(g, _to_device(batch, self.device), sync=micro == cfg.grad_accum - 1 or not info.enabled,
                          into=out)
        return out

    def backward(self, g: int, batch: dict[str, Any], sync: bool, into: _StepLosses) -> None:
        """Forward + backward of micro-batch ``g``; its loss and metrics added to ``into``."""
        cfg = self.cfg
        # Masks and dropout of micro-batch g depend on (seed, g) only.
        torch.manual_seed(mix_seed(cfg.seed, g))
        with (nullcontext() if sync else self.model.no_sync()):
            with _autocast(self.device, self.amp_dtype):
                out = self.model(batch)
            # Mean over micro-batches (DDP averages over ranks on top).
            loss = out.loss.float() / cfg.grad_accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        lv = float(out.loss.detach())
        into.finite &= math.isfinite(lv)
        into.loss += lv / cfg.grad_accum
        for k, v in out.metrics.items():
            into.metrics[k] = into.metrics.get(k, 0.0) + float(v) / cfg.grad_accum

    def optimizer_step(self, losses: _StepLosses) -> tuple[float, bool]:
        """Clip, agree across ranks, step (or skip a non-finite step). Returns (grad norm, finite)."""
        cfg, counters = self.cfg, self.counters
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        # Clip and measure in one pass; inf max_norm only measures.
        gnorm = float(torch.nn.utils.clip_grad_norm_(
            self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        # Every rank must take the same decision: share "was my loss finite" (and, in the same
        # call, how many files were read and dropped).
        shared = torch.tensor([0.0 if losses.finite else 1.0, float(losses.read), float(losses.dropped)],
                              dtype=torch.float64, device=self.device)
        all_reduce_sum(shared, self.info)
        bad = shared[:1]
        counters["read_items"] += int(shared[1].item())
        counters["skipped_items"] += int(shared[2].item())
        err = usable_fraction_error("training", counters["read_items"], counters["skipped_items"],
                                    len(self.train_data), cfg.min_usable_fraction, self.first_dropped)
        if err:
            raise UnusableDataError(f"stopping at step {self.step + 1}: {err}")
        finite = bool(bad.item() == 0) and math.isfinite(gnorm)
        if self.scaler is not None:
            # fp16: GradScaler skips overflowing steps itself and lowers the scale; only a
            # non-finite loss counts as a numerical failure.
            self.scaler.step(self.opt)
            self.scaler.update()
            finite = bool(bad.item() == 0)
        elif finite:
            self.opt.step()
        self.step += 1
        if finite:
            counters["nonfinite_in_a_row"] = 0
        else:
            self.count_nonfinite("loss" if bad.item() else "gradient", losses.loss, gnorm)
        return gnorm, finite

    def count_nonfinite(self, what: str, loss: float, gnorm: float) -> None:
        """A skipped step: counted, warned about, and fatal after ``max_nonfinite_steps`` in a row."""
        cfg, counters = self.cfg, self.counters
        counters["nonfinite_steps"] += 1
        counters["nonfinite_in_a_row"] += 1
        log.warning("step %d: non-finite %s (loss %.4g, grad norm %.4g); update skipped "
                    "(%d in a row, limit %d)", self.step, what, loss, gnorm, counters["nonfinite_in_a_row"],
                    cfg.max_nonfinite_steps)
        if counters["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"stopping at step {self.step}: {counters['nonfinite_in_a_row']} steps in a row "
                f"had a non-finite loss or gradient (max_nonfinite_steps="
                f"{cfg.max_nonfinite_steps}); last checkpoint: step {self.last_saved}. "
                "Lower train.lr, check the data (`aviary check-data`), or use fp32.")

    def log_step(self, losses: _StepLosses, gnorm: float, finite: bool, lr: float) -> None:
        """Add the step to the logging window; every ``log_every`` steps write its averages."""
        cfg, w = self.cfg, self.window
        if finite and losses.used:  # skipped and empty steps stay out of the averages
            for k, v in {"loss": losses.loss, "grad_norm": gnorm, **losses.metrics}.items():
                w.sums[k] = w.sums.get(k, 0.0) + v
            w.steps += 1
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            self.write_window(lr)
        self.bar.update(1)

    def write_window(self, lr: float) -> None:
        """One metrics line: the window averaged over its steps and the ranks; a fresh window."""
        cfg, w, unit = self.cfg, self.window, self.train_data.unit
        rec = _log_record(w.sums, w.steps, w.amount, w.t0, self.step, lr, self.counters, self.train_data,
                          self.info, self.device)
        rec["precision"] = self.precision_name
        self.metrics.write(rec)
        self.result.history.append(rec)
        self.result.train_loss = rec.get("loss", math.nan)
        self.bar.set_postfix(loss=f"{rec.get('loss', math.nan):.4f}", **{f"{unit}/s": f"{rec['throughput']:.1f}"})
        if self.bar.disable and self.info.is_main:
            # No progress bar (not a terminal, e.g. a batch job): log a line instead.
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g %.1f %s/s", self.step, cfg.steps,
                     rec.get("loss", math.nan), lr, rec.get("grad_norm", math.nan), rec["throughput"], unit)
        self.window = _Window()

    def validate(self) -> None:
        self.result.valid_loss = _validate(self.core, self.valid_data, self.cfg, self.device, self.amp_dtype,
                                           self.step, self.metrics, self.result, self.info)

    def stop_requested(self, stop: StopFlag) -> bool:
        """After SIGINT / SIGTERM on any rank: every rank checkpoints this step and stops."""
        flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=self.device)
        all_reduce_sum(flag, self.info)
        if flag.item() > 0:
            self.checkpoint(self.step)
            self.result.interrupted = True
            log.warning("stopped at step %d; continue with --resume", self.step)
            return True
        return False

    def checkpoint(self, at: int) -> None:
        """Write the checkpoint of step ``at`` (rank 0); every rank learns whether it failed."""
        failed = torch.zeros(1, device=self.device)
        try:
            _save(self.run_dir, at, self.model, self.opt, self.scaler, self.model_cfg, self.cfg, self.shadow.pos,
                  self.counters, self.info)
        except BaseException as e:
            failed += 1
            all_reduce_sum(failed, self.info)  # let the other ranks stop too, not hang
            if isinstance(e, ckpt.CheckpointError):
                raise ckpt.CheckpointError(
                    f"stopping at step {at}: {e}. Fix the cause (e.g. free disk space), then continue "
                    f"with --resume (from step {self.last_saved}).") from e
            raise
        all_reduce_sum(failed, self.info)
        if failed.item():
            raise ckpt.CheckpointError(f"rank 0 could not write the checkpoint of step {at}")
        self.last_saved = at

    def finish(self) -> None:
        """End of the run: a last validation, refuse a diverged model, the final checkpoint."""
        if self.valid_data is not None:
            self.validate()
        _check_final(self.core, self.result, self.counters, self.step, self.last_saved,
                     self.valid_data is not None, self.device, self.info)
        if self.last_saved != self.step:
            self.checkpoint(self.step)

    def summary(self) -> PretrainResult:
        result = self.result
        result.step = self.step
        result.model = self.core
        result.nonfinite_steps = self.counters["nonfinite_steps"]
        skipped = getattr(self.train_data, "skipped", None)
        if skipped:
            log.warning("%d unusable files were skipped during training (first: %s)",
                        len(skipped), next(iter(skipped.items())))
        return result


def _check_final(core: nn.Module, result: PretrainResult, counters: dict[str, int], step: int,
                 last_saved: int, validated: bool, device: torch.device, info: DistInfo) -> None:
    """Refuse to finish (exit 0, write the bundle) with a model that gives NaN.

    A run may end within ``max_nonfinite_steps`` of a blow-up: the last steps were skipped, the
    weights are finite but huge (lr 1e30) or non-finite, and their features are NaN.
    """
    problems = []
    if counters["nonfinite_in_a_row"]:
        problems.append(f"its last {counters['nonfinite_in_a_row']} steps had a non-finite loss or gradient")
    bad = nonfinite_tensors(core.state_dict())
    if bad:
        problems.append(f"{len(bad)} weight tensors are non-finite (first: {bad[0]})")
    if info.is_main and validated and result.valid_loss is not None and not math.isfinite(result.valid_loss):
        problems.append(f"the final validation loss is {result.valid_loss}")
    # Rank 0 alone knows the validation loss: agree, or the other ranks would wait forever.
    flag = torch.tensor([1.0 if problems else 0.0], device=device)
    all_reduce_sum(flag, info)
    if flag.item() > 0:
        raise NonFiniteError(
            f"step {step}: the run diverged: {'; '.join(problems) or 'see rank 0'}. The final weights "
            f"are not written (last checkpoint: step {last_saved}). Lower train.lr, check the data "
            "(`aviary check-data`), or use fp32.")


def _log_record(window: dict[str, float], n: int, amount: float, t0: float, step: int, lr: float,
                counters: dict[str, int], data: TrainData, info: DistInfo, device: torch.device
                ) -> dict[str, Any]:
    """Average a logging window over its steps (and over ranks)."""
    keys = sorted(window)
    vals = torch.tensor([window[k] for k in keys] + [float(n), amount], dtype=torch.float64, device=device)
    all_reduce_sum(vals, info)
    n_all = float(vals[-2])
    rec: dict[str, Any] = {"step": step, "lr": lr}
    for i, k in enumerate(keys):
        rec[k] = float(vals[i]) / max(n_all, 1.0)
    rec["throughput"] = float(vals[-1]) / max(time.perf_counter() - t0, 1e-9)
    rec["nonfinite_steps"] = counters["nonfinite_steps"]
    rec["skipped_items"] = counters["skipped_items"]
    return rec


def _validate(core: nn.Module, data: TrainData, cfg: TrainConfig, device: torch.device,
              amp_dtype: torch.dtype | None, step: int, metrics: MetricsWriter,
              result: PretrainResult, info: DistInfo) -> float | None:
    """Rank 0 computes the validation loss; the others wait."""
    loss = None
    err = None
    if info.is_main:
        try:
            vals = validation_loss(core, data, cfg, device, amp_dtype)
        except UnusableDataError as e:
            err, vals = e, {}
        if vals:
            rec = {"step": step, "split": "valid", **vals}
            metrics.write(rec)
            result.history.append(rec)
            loss = vals["loss"]
            log.info("step %d: validation loss %.4f", step, loss)
    # Also the barrier: every rank learns whether rank 0 found the split unusable.
    flag = torch.tensor([1.0 if err is not None else 0.0], device=device)
    all_reduce_sum(flag, info)
    if flag.item() > 0:
        raise UnusableDataError(f"validation at step {step}: {err or 'unusable on rank 0'}")
    return loss
