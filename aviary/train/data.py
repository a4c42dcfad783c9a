"""Where the pretraining loop's micro-batches come from, deterministically.

The loop sees one *global stream* of micro-batches: epoch 0's batches, then epoch 1's, ...
Each epoch's batch list is a pure function of ``(seed, epoch)`` (a duration-bucketed
shuffle), and everything random about one micro-batch (which crop of each utterance; the
model's masks and dropout) is a pure function of ``(seed, g)``, where ``g`` is the
micro-batch's index in the global stream. Nothing depends on RNG state carried from earlier
batches, so:

* a resumed run only needs ``(epoch, position)`` to continue exactly (no RNG state saved);
* results do not depend on ``num_workers`` (crops are decided before items reach a worker);
* under DistributedDataParallel with ``W`` processes, rank ``r`` takes the micro-batches
  ``g = r, r + W, r + 2W, ...``: a step of ``W`` ranks x ``A`` accumulation micro-batches
  consumes exactly what one process with ``W * A`` accumulation micro-batches would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from aviary.audio import AudioError, load_audio
from aviary.config import ConfigError
from aviary.data import tokens
from aviary.data.dataset import collate_audio
from aviary.data.manifest import load_manifest
from aviary.data.sampler import DurationBatchSampler
from aviary.data.sampler import mix_seed  # noqa: F401  (the loop's seeds; re-exported)

log = logging.getLogger(__name__)


class TrainData:
    """A split of a corpus as the loop uses it.

    Subclasses implement :meth:`epoch_batches` (lists of item indices), :meth:`load_item`
    (one item, with all its randomness drawn from ``seed``) and :meth:`collate`.
    """

    #: Amount of data per micro-batch, for the throughput display (e.g. "s" of audio).
    unit: str = "items"

    def __len__(self) -> int:
        raise NotImplementedError

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The micro-batches of one epoch (a pure function of ``epoch`` and ``seed``)."""
        raise NotImplementedError

    def load_item(self, index: int, seed: int) -> Any | None:
        """Load item ``index``; ``None`` if it is unusable (it is then dropped from its batch)."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> dict[str, Any]:
        """Merge loaded items into the batch dict the pretraining model's ``forward`` takes."""
        raise NotImplementedError

    def batch_amount(self, batch: dict[str, Any]) -> float:
        """How much data a collated batch holds, in :attr:`unit` (for throughput)."""
        return float(len(batch.get("ids", ())))

    def item_name(self, index: int) -> str:
        """How error messages name item ``index`` (a file path where there is one)."""
        return f"item {index}"


@dataclass
class StreamPosition:
    """Where the global micro-batch stream stands: batch ``position`` of ``epoch``, global index ``g``."""

    epoch: int = 0
    position: int = 0
    g: int = 0


class MicroBatchStream:
    """Iterator over this rank's micro-batches as ``(g, [(index, item_seed), ...])``.

    Args:
        data: the split.
        seed: run seed.
        start: where the global stream starts (from a checkpoint, or the beginning).
        rank, world_size: this process's share (global index ``g % world_size == rank``).
    """

    def __init__(self, data: TrainData, seed: int, start: StreamPosition, rank: int = 0,
                 world_size: int = 1) -> None:
        self.data, self.seed, self.rank, self.world = data, seed, rank, world_size
        self.pos = StreamPosition(start.epoch, start.position, start.g)
        self._batches: list[list[int]] | None = None

    def _epoch(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = self.data.epoch_batches(self.pos.epoch, self.seed)
            if not self._batches:
                raise ConfigError(f"the training data gives no batch in epoch {self.pos.epoch}: "
                                  f"{len(self.data)} items; is max_batch_seconds too small?")
        return self._batches

    def next_global(self) -> tuple[int, list[int]]:
        """Advance the global stream by one micro-batch (every rank calls this for every g)."""
        batches = self._epoch()
        while self.pos.position >= len(batches):
            self.pos.epoch += 1
            self.pos.position = 0
            self._batches = None
            batches = self._epoch()
        g, idx = self.pos.g, batches[self.pos.position]
        self.pos.position += 1
        self.pos.g += 1
        return g, idx

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            for _ in range(self.world):
                g, idx = self.next_global()
                if g % self.world == self.rank:
                    mine = (g, idx)
            g, idx = mine
            # One seed per item, from the global batch index and the item's slot in it.
            yield [(i, mix_seed(self.seed, g, k), g) for k, i in enumerate(idx)]


class ItemDataset(torch.utils.data.Dataset):
    """Adapts :class:`TrainData` to ``torch.utils.data``: items are ``(index, seed, g)``."""

    def __init__(self, data: TrainData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, Any, int]:
        index, seed, g = key
        return g, self.data.load_item(index, seed), index


class Collate:
    """Drops unusable items, collates the rest.

    Returns ``(g, batch or None, dropped item indices, number of items read)``: the loop
    counts them (also across DataLoader workers, whose ``skipped`` dicts it cannot see).
    """

    def __init__(self, data: TrainData) -> None:
        self.data = data

    def __call__(self, triples: list[tuple[int, Any, int]]
                 ) -> tuple[int, dict[str, Any] | None, list[int], int]:
        g = triples[0][0]
        items = [it for _, it, _ in triples if it is not None]
        dropped = [i for _, it, i in triples if it is None]
        return g, (self.data.collate(items) if items else None), dropped, len(triples)


def duration_batches(durations: Sequence[float], max_seconds: float, seed: int, epoch: int,
                     bucket_width: float = 1.0) -> list[list[int]]:
    """Duration-bucketed batches: similar lengths together, total seconds per batch bounded.

    Delegates to :class:`aviary.data.sampler.DurationBatchSampler` with one replica: the loop
    shards the global stream itself, so that W ranks x A accumulation steps consume exactly
    the micro-batches of one process with W * A accumulation steps.
    """
    sampler = DurationBatchSampler(list(durations), max_seconds=max_seconds, seed=seed)
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


class AudioTrainData(TrainData):
    """Audio utterances of a manifest, randomly cropped to ``crop_seconds``.

    Args:
        utts: the split's utterances (:class:`aviary.data.Utterance`).
        max_batch_seconds: total (cropped) audio per micro-batch.
        crop_seconds: longer utterances are cut to a random window of this length.
        min_seconds: shorter utterances are dropped.
        sample_rate: rate the model expects.
        normalize_db: level normalisation applied when loading (``None``: none).
    """

    unit = "s"
    # Batches are zero-padded to a multiple of this (0.32 s: 32 frames at 10 ms). Every batch
    # of duration-bucketed audio has a new length, and on a CPU under bf16 autocast every new
    # matrix shape makes oneDNN compile and cache kernels (~1.5 MB and a few ms each, up to
    # 1,024): aalbert-cpu's memory grew 0.9 -> 1.6 GB in its first 130 steps. Rounding keeps
    # the shapes to a few dozen; models ignore the padding (``wav_lengths``).
    pad_seconds = 0.32

    def __init__(self, utts: Sequence[Any], max_batch_seconds: float, crop_seconds: float,
                 min_seconds: float = 0.0, sample_rate: int = 16000,
                 normalize_db: float | None = None) -> None:
        kept = [u for u in utts if u.duration >= min_seconds]
        if len(kept) < len(utts):
            log.info("dropped %d of %d utterances shorter than %.2f s",
                     len(utts) - len(kept), len(utts), min_seconds)
        self.utts = kept
        self.max_batch_seconds = max_batch_seconds
        self.crop_seconds = crop_seconds
        self.sample_rate = sample_rate
        self.normalize_db = normalize_db
        self.durations = [min(u.duration, crop_seconds) for u in kept]
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.utts)

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        return duration_batches(self.durations, self.max_batch_seconds, seed, epoch)

    def crop_offset(self, u: Any, seed: int) -> float:
        """Where the crop of utterance ``u`` starts (seconds; 0 when it is not cropped)."""
        if u.duration <= self.crop_seconds:
            return 0.0
        # Random crop (s3prl crops sequence_length frames at a random start).
        return float(np.random.default_rng(seed).uniform(0.0, u.duration - self.crop_seconds))

    def load_item(self, index: int, seed: int) -> dict[str, Any] | None:
        u = self.utts[index]
        offset = self.crop_offset(u, seed)
        try:
            wav = load_audio(u.audio, self.sample_rate, self.normalize_db, offset=offset,
                             duration=self.crop_seconds)
        except AudioError as e:
            # A broken file is skipped and counted, never fatal: one bad file in a 1000-hour
            # corpus must not stop a run (`aviary check-data` lists them all up front).
            if u.id not in self.skipped:
                log.warning("skipping %s: %s", u.id, e)
            self.skipped[u.id] = str(e)
            return None
        return {"id": u.id, "speaker": u.speaker, "wav": torch.from_numpy(wav)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_audio(items, pad_to_multiple=round(self.pad_seconds * self.sample_rate))

    def batch_amount(self, batch: dict[str, Any]) -> float:
        return float(batch["wav_lengths"].sum()) / self.sample_rate

    def item_name(self, index: int) -> str:
        u = self.utts[index]
        reason = self.skipped.get(u.id)  # known when loaded in this process (num_workers=0)
        if reason is None:
            return str(u.audio)
        return reason if str(u.audio) in reason else f"{u.audio}: {reason}"


def build_train_data(batch_kind: str, data_path: str | Path, split: str | None,
                     train_cfg: Any, model_cfg: Any) -> TrainData:
    """The :class:`TrainData` of one split of ``data_path`` for a model family.

    Args:
        batch_kind: the family's ``batch_kind`` (``"audio"`` or ``"tokens"``); audio for an
            objective trained on frame targets (its config has ``targets``: HuBERT) carries them.
        data_path: corpus directory or manifest file.
        split: ``"train"``, ``"valid"``, ... or ``None`` for the whole manifest.
        train_cfg: the :class:`~aviary.train.config.TrainConfig`.
        model_cfg: the model's pretraining config (token families read their vocabulary).
    """
    if batch_kind == "audio" and hasattr(getattr(model_cfg, "objective", None), "targets"):
        from aviary.train.targets import build_target_train_data

        return build_target_train_data(data_path, split, train_cfg, model_cfg)
    if batch_kind == "audio":
        utts = load_manifest(data_path, split)
        # No level normalisation here: the model's front-end owns it (normalize_db).
        return AudioTrainData(utts, train_cfg.max_batch_seconds, train_cfg.crop_seconds,
                              train_cfg.min_seconds)
    if batch_kind == "tokens":
        return tokens.TokenTrainData.from_path(data_path, split, train_cfg, model_cfg)
    raise ConfigError(f"unknown batch_kind {batch_kind!r}: allowed 'audio' or 'tokens'")
