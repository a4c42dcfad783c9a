"""Audio datasets and collation: utterances of a manifest -> padded waveform batches.

``AudioDataset[i]`` returns one item (a dict, see :meth:`AudioDataset.__getitem__`), or
``None`` for a broken file when ``skip_bad=True``; :func:`collate_audio` drops the ``None``
items and pads the rest into the batch dict documented in DEVELOPING.md::

    {"wavs": (B, N) float32, zero padded, "wav_lengths": (B,) long, "ids": [str],
     "speakers": [str], "keywords": [str] | None, "phones": [list] | None}

Random crops (pretraining) are seeded per ``(seed, epoch, index)``: the same run gives the same
crops whatever the worker count or the order items are fetched in, so runs repeat and a resumed
run reads exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from aviary.audio import AudioError, load_audio, normalize_level
from aviary.data.manifest import Utterance

log = logging.getLogger(__name__)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances read with :func:`aviary.audio.load_audio`, optionally cropped and cached.

    Args:
        utts: the utterances (e.g. ``load_manifest(dir, "train")``).
        sample_rate: rate to deliver (files are resampled).
        max_seconds: crop longer utterances to this many seconds (``None``: never). Only the
            crop is decoded, so a 2-hour file costs no more than a short one.
        random_crop: random crop start (pretraining) or the start of the file (evaluation).
        seed: crop seed; item ``i`` in epoch ``e`` uses ``(seed, e, i)``.
        skip_bad: return ``None`` (and count it in ``bad``) for a file that fails to load,
            instead of raising :class:`~aviary.audio.AudioError` naming the file.
        normalize_db: level normalisation (s3prl: -25), applied after cropping.
        cache: keep decoded audio in memory as int16 (half the size of float32; for small
            corpora). Per process: each DataLoader worker holds its own cache.
    """

    def __init__(self, utts: Sequence[Utterance], sample_rate: int = 16000,
                 max_seconds: float | None = None, random_crop: bool = True, seed: int = 0,
                 skip_bad: bool = False, normalize_db: float | None = None,
                 cache: bool = False) -> None:
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
        self.utts = list(utts)
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.random_crop = random_crop
        self.seed = seed
        self.skip_bad = skip_bad
        self.normalize_db = normalize_db
        self.cache = cache
        self.epoch = 0
        #: ids of files skipped because they failed to load -> the reason (this process only).
        self.bad: dict[str, str] = {}
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.utts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which (with the seed) decides the random crops."""
        self.epoch = int(epoch)

    @property
    def durations(self) -> list[float]:
        """Seconds each item will have (after cropping), for :class:`DurationBatchSampler`."""
        cap = self.max_seconds if self.max_seconds is not None else float("inf")
        return [min(u.duration, cap) for u in self.utts]

    def crop_offset(self, index: int) -> float:
        """Start (seconds) of item ``index``'s crop in the current epoch."""
        u = self.utts[index]
        if self.max_seconds is None or u.duration <= self.max_seconds or not self.random_crop:
            return 0.0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return float(rng.uniform(0.0, u.duration - self.max_seconds))

    def _load(self, index: int, offset: float) -> np.ndarray:
        u = self.utts[index]
        if not self.cache:
            return load_audio(u.audio, self.sample_rate, offset=offset, duration=self.max_seconds)
        if index not in self._cache:
            x = load_audio(u.audio, self.sample_rate)
            self._cache[index] = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
        x16 = self._cache[index]
        start = int(round(offset * self.sample_rate))
        stop = x16.size if self.max_seconds is None else start + int(round(self.max_seconds * self.sample_rate))
        return x16[start:stop].astype(np.float32) / 32767.0

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """One item: ``{"id", "speaker", "keyword", "wav": (N,) float32 tensor, "offset", "phones"}``.

        ``phones`` (when the manifest has them) are shifted to the crop's time origin and
        clipped to it, so frame labels computed from them match the cropped audio.
        Returns ``None`` for a broken file when ``skip_bad`` is set.
        """
        u = self.utts[index]
        offset = self.crop_offset(index)
        try:
            wav = self._load(index, offset)
        except AudioError as e:
            if not self.skip_bad:
                raise
            if u.id not in self.bad:
                self.bad[u.id] = str(e)
                log.warning("skipping bad file (%d so far): %s", len(self.bad), e)
            return None
        if self.normalize_db is not None:
            wav = normalize_level(wav, self.normalize_db)
        phones = None
        if u.phones is not None:
            end = offset + wav.size / self.sample_rate
            phones = [(s, max(a, offset) - offset, min(b, end) - offset)
                      for s, a, b in u.phones if b > offset and a < end]
        return {"id": u.id, "speaker": u.speaker, "keyword": u.keyword, "offset": offset,
                "wav": torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), "phones": phones}


def collate_audio(items: Sequence[dict[str, Any] | None], pad_to_multiple: int = 1) -> dict[str, Any]:
    """Pad items of :class:`AudioDataset` into a batch; ``None`` items (skipped files) are dropped.

    ``pad_to_multiple``: the padded length is rounded up to a multiple of this many samples
    (the lengths stay the true ones), so that batches share a few shapes (see
    :class:`aviary.train.data.AudioTrainData`).

    Returns:
        ``{"wavs": (B, N) float32 zero padded, "wav_lengths": (B,) long, "ids": list[str],
        "speakers": list[str], "keywords": list | None, "phones": list | None,
        "num_skipped": int}``. ``keywords`` / ``phones`` are None when no item has them.
        An all-skipped batch gives B = 0 (wavs of shape (0, 0)).
    """
    kept = [it for it in items if it is not None]
    lengths = torch.tensor([it["wav"].numel() for it in kept], dtype=torch.long)  # (B,)
    n = int(lengths.max()) if len(kept) else 0
    n += -n % max(int(pad_to_multiple), 1)
    wavs = torch.zeros(len(kept), n, dtype=torch.float32)  # (B, N)
    for row, it in enumerate(kept):
        wavs[row, : it["wav"].numel()] = it["wav"]
    keywords = [it.get("keyword") for it in kept]
    phones = [it.get("phones") for it in kept]
    return {"wavs": wavs, "wav_lengths": lengths, "ids": [it["id"] for it in kept],
            "speakers": [it["speaker"] for it in kept],
            "keywords": keywords if any(k is not None for k in keywords) else None,
            "phones": phones if any(p is not None for p in phones) else None,
            "num_skipped": len(items) - len(kept)}
