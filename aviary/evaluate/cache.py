"""On-disk feature cache: run an upstream over a corpus once, probe every layer from disk.

s3prl recomputes upstream features every downstream epoch (REFERENCE.md section 6); here
``aviary extract`` writes every requested layer's frames once and the frozen probes read
them memory-mapped, so probing all L+1 layers with three heads costs one extraction.

Layout of a cache directory::

    CACHE/plan.json                 what will be written: upstream info, layers, dtype,
                                    the utterances of every shard (ids, durations)
    CACHE/shard-00000/layer-03.npy  (frames of the shard's utterances, H) for layer 3
    CACHE/shard-00000/shard.json    ids, frame offsets and lengths inside the shard
    CACHE/index.json                written last: the plan plus "complete": true and
                                    "precision_requested" (the plan holds the resolved
                                    "precision" the forward passes ran in)

Resumability (issue 9): a shard is written into ``shard-XXXXX.tmp/``, every file fsynced,
then renamed to ``shard-XXXXX/`` in one atomic step. A kill leaves at most one ``.tmp``
directory, which the next run deletes and redoes; completed shards are kept. Because the
plan fixes which utterance goes into which shard, the finished cache holds every
utterance exactly once however often the run was interrupted.

Checksums (version 2): ``shard.json`` holds the SHA-256 of every layer file, computed at
write. A layer file is verified the first time it is read (a flipped byte would otherwise
reach the probes as NaN or changed features), and ``aviary extract`` re-creates any finished
shard that fails its check (a truncated or damaged shard is redone, not skipped).

Validation: :func:`open_cache` refuses an incomplete cache, files whose shapes disagree with
their ``shard.json``, a cache made by a different upstream (weights fingerprint) and
utterances whose durations differ from the manifest's (a regenerated corpus), each with an
error naming the cache and the problem.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from aviary.audio import AudioError, load_audio
from aviary.data.sampler import padded_batches
from aviary.evaluate.upstreams import UpstreamInfo, describe_upstream
from aviary.models.upstream import Upstream
from aviary.precision import autocast_context, resolve_precision
from aviary.storage import atomic_dir, file_sha256, read_json, write_json_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""1: no checksums (still read, unverified); 2: SHA-256 of every layer file in shard.json."""
_READABLE_VERSIONS = (1, 2)
_DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(RuntimeError):
    """A feature cache is missing, incomplete, corrupted or does not match what is asked."""


def parse_layers(spec: str | Sequence[int] | None, num_hidden_states: int) -> list[int]:
    """``"all"`` / ``None`` / ``"0,3,5"`` / ``[0, 3]`` -> sorted unique hidden-state indices."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(num_hidden_states))
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "last":
            return [num_hidden_states - 1]
        try:
            spec = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers {spec!r}: expected 'all', 'last' or comma-separated integers") from None
    out = []
    for k in spec:
        if not -num_hidden_states <= int(k) < num_hidden_states:
            raise ValueError(f"layer {k} out of range: the upstream has {num_hidden_states} hidden states "
                             f"(0..{num_hidden_states - 1})")
        out.append(int(k) % num_hidden_states)
    if not out:
        raise ValueError(f"--layers {spec!r} selects no layer")
    return sorted(set(out))


def _read_json(path: Path) -> Any:
    return read_json(path, error=CacheError, hint="the cache is corrupted, delete it and extract again")


def plan_shards(ids: Sequence[str], durations: Sequence[float], shard_seconds: float) -> list[list[int]]:
    """Group utterances, sorted by duration, into shards of at most ``shard_seconds`` of audio.

    Sorting by length keeps padding small inside each extraction batch. The plan is a pure
    function of (ids, durations, shard_seconds), so a resumed run reproduces it exactly.

    Returns:
        A list of shards, each a list of positions into ``ids``.
    """
    order = sorted(range(len(ids)), key=lambda i: (durations[i], ids[i]))
    shards: list[list[int]] = []
    cur: list[int] = []
    acc = 0.0
    for i in order:
        if cur and acc + durations[i] > shard_seconds:
            shards.append(cur)
            cur, acc = [], 0.0
        cur.append(i)
        acc += durations[i]
    if cur:
        shards.append(cur)
    return shards


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_problem(sdir: Path, layers: Sequence[int], ids: Sequence[str] | None = None) -> str | None:
    """Why a finished shard directory cannot be used (``None``: it verifies).

    Checks that ``shard.json`` is readable (and lists ``ids``), and that every layer file
    exists and matches the checksum stored at write.
    """
    try:
        meta = json.loads((sdir / "shard.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{sdir / 'shard.json'}: unreadable ({e})"
    if ids is not None and meta.get("ids") != list(ids):
        return f"{sdir / 'shard.json'}: utterance ids differ from the plan"
    sums = meta.get("sha256")
    if not isinstance(sums, dict):
        return f"{sdir / 'shard.json'}: no checksums (written by an older aviary)"
    for k in layers:
        f = sdir / f"layer-{k:02d}.npy"
        if not f.is_file():
            return f"{f}: missing"
        if sums.get(f.name) != file_sha256(f):
            return f"{f}: checksum mismatch (truncated or corrupted)"
    return None


@dataclass(frozen=True)
class ExtractStats:
    """What one :func:`extract_to_cache` call did."""

    path: str
    utterances: int
    shards_total: int
    shards_written: int
    audio_seconds: float
    seconds: float
    precision: str = "fp32"  # resolved forward-pass precision
    skipped: int = 0  # unusable files left out (``--skip-bad``; listed in index.json)

    @property
    def x_real_time(self) -> float:
        return self.audio_seconds / self.seconds if self.seconds > 0 else float("inf")


def load_waveforms(utts: Sequence[Any], sample_rate: int, normalize_db: float | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read utterances' audio as one zero-padded batch ``(B, N)`` with lengths ``(B,)``."""
    try:
        arrays = [load_audio(u.audio, sample_rate=sample_rate, normalize_db=normalize_db) for u in utts]
    except AudioError as e:
        raise AudioError(f"{e}; list every such file with `aviary check-data`, or pass --skip-bad "
                         "to leave unusable files out (counted)") from None
    lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
    wavs = torch.zeros(len(arrays), int(lengths.max()))
    for i, a in enumerate(arrays):
        wavs[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return wavs, lengths  # (B, N), (B,)


def extract_to_cache(upstream: Upstream, utterances: Sequence[Any], out: str | os.PathLike, *,
                     name: str, layers: str | Sequence[int] | None = "all", dtype: str = "float16",
                     batch_seconds: float = 80.0, shard_seconds: float = 600.0,
                     precision: str = "auto", normalize_db: float | None = None,
                     progress: bool = True, info: UpstreamInfo | None = None,
                     skipped: Sequence[tuple[str, str]] = ()) -> ExtractStats:
    """Run ``upstream`` once over ``utterances`` and write the requested layers to ``out``.

    Args:
        upstream: any :class:`~aviary.models.upstream.Upstream` (run in eval mode, no grad).
        utterances: objects with ``id``, ``audio`` (path) and ``duration`` (seconds), e.g.
            :class:`aviary.data.Utterance`.
        out: cache directory (created; an existing compatible partial cache is resumed).
        name: the upstream's display name (stored in the index and in results).
        layers: ``"all"``, ``"last"``, ``"0,3"`` or a list of hidden-state indices.
        dtype: ``"float16"`` (half the disk, plenty for probing) or ``"float32"``.
        batch_seconds: padded audio seconds per forward pass.
        shard_seconds: audio seconds per shard (the unit of resumption).
        precision: forward-pass precision, ``auto`` / ``fp32`` / ``bf16`` (:mod:`aviary.precision`;
            ``auto``: bf16 where native). The resolved one is part of the plan, so a cache is
            never resumed in another precision.
        normalize_db: passed to :func:`aviary.audio.load_audio` (e.g. -25 for s3prl's level).
        progress: show a tqdm bar.
        info: precomputed :func:`describe_upstream` (saves hashing the weights twice).
        skipped: ``(id, error)`` of utterances left out as unusable, recorded in the index.

    Returns:
        :class:`ExtractStats`.

    Raises:
        CacheError: ``out`` holds a cache made with other settings or another upstream.
    """
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {list(_DTYPES)}")
    if not utterances:
        raise ValueError("no utterances to extract")
    out = Path(out)
    ids = [str(u.id) for u in utterances]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate utterance ids in the corpus, e.g. {dup}")
    durations = [float(u.duration) for u in utterances]
    device = next(iter(upstream.parameters()), torch.zeros(0)).device
    resolved = resolve_precision(precision, device)
    log.info("extract %s: precision %s (requested %s, device %s)", name, resolved, precision, device)
    info = info or describe_upstream(upstream, name)
    layer_list = parse_layers(layers, info.num_hidden_states)
    shards = plan_shards(ids, durations, shard_seconds)
    plan = {
        "version": CACHE_VERSION, "upstream": info.to_dict(), "layers": layer_list, "dtype": dtype,
        "frame_shift": info.frame_shift, "hidden_size": info.hidden_size, "normalize_db": normalize_db,
        "precision": resolved,
        "shards": [{"ids": [ids[i] for i in s], "durations": [durations[i] for i in s]} for s in shards],
    }
    if skipped:
        plan["skipped_files"] = [list(x) for x in skipped]
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        old = _read_json(plan_path)
        if "precision" not in old:
            # Made before the precision was recorded: which one it ran in is unknown.
            log.warning("%s: the cache does not record its precision; assuming %s", out, resolved)
            old["precision"] = resolved
        if old != json.loads(json.dumps(plan)) and not any(out.glob("shard-?????")):
            # Nothing finished under the old plan (e.g. it stopped at its first bad file and is
            # re-run with --skip-bad): nothing to mix up, start over with the new plan.
            log.info("%s: replacing the plan of an extraction that finished no shard", out)
            write_json_atomic(plan_path, plan)
            old = json.loads(json.dumps(plan))
        if old != json.loads(json.dumps(plan)):
            diff = [k for k in plan if old.get(k) != json.loads(json.dumps(plan[k]))]
            raise CacheError(f"{out}: holds a feature cache made with different settings ({', '.join(diff)} "
                             f"differ); use another --out or delete it")
        log.info("%s: resuming an existing cache", out)
    else:
        write_json_atomic(plan_path, plan)

    upstream.eval()
    max_layer = max(layer_list)
    np_dtype = _DTYPES[dtype]
    t0 = time.perf_counter()
    todo = []
    for si in range(len(shards)):
        final = out / _shard_name(si)
        tmp = out / (_shard_name(si) + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run: redo the shard
        if final.exists():
            # A finished shard is kept only when it verifies: "extract again" must repair a
            # truncated or bit-flipped one, not skip it.
            problem = shard_problem(final, layer_list, [ids[i] for i in shards[si]])
            if problem is None:
                continue
            log.warning("%s: re-creating the shard: %s", final, problem)
            shutil.rmtree(final)
        todo.append(si)
    audio_todo = sum(durations[i] for si in todo for i in shards[si])
    bar = tqdm(total=round(audio_todo), unit="s audio", desc=f"extract {name}", disable=not progress)
    for si in todo:
        pos = shards[si]
        feats: dict[int, list[np.ndarray]] = {k: [] for k in layer_list}
        lengths_out: list[int] = []
        for batch in padded_batches(pos, durations, batch_seconds):
            wavs, wav_lengths = load_waveforms([utterances[i] for i in batch], _sample_rate(upstream), normalize_db)
            with torch.no_grad(), autocast_context(resolved, device):
                states, lengths = upstream.extract(wavs.to(device), wav_lengths.to(device), max_layer=max_layer)
            if len(states) < max_layer + 1:
                raise CacheError(f"upstream {name} returned {len(states)} hidden states, expected at least {max_layer + 1}")
            lengths = lengths.cpu().tolist()
            for k in layer_list:
                h = states[k].float().cpu().numpy()  # (B, T, H)
                for b, n in enumerate(lengths):
                    row = h[b, :n].astype(np_dtype)
                    if not np.isfinite(row).all():
                        # NaN features would train every probe to chance, silently.
                        u = utterances[batch[b]]
                        raise CacheError(f"{u.audio}: upstream {name} gives non-finite features for "
                                         f"utterance {u.id!r} at hidden state {k}"
                                         f"{' (float16 overflow? try --dtype float32)' if np.isfinite(h[b, :n]).all() else ''}")
                    feats[k].append(row)
            lengths_out += [int(n) for n in lengths]
            bar.update(round(sum(durations[i] for i in batch)))
        _write_shard(out, si, [ids[i] for i in pos], lengths_out, feats)
    bar.close()
    write_json_atomic(out / "index.json", {**plan, "precision_requested": precision, "complete": True})
    elapsed = time.perf_counter() - t0
    return ExtractStats(path=str(out), utterances=len(ids), shards_total=len(shards), shards_written=len(todo),
                        audio_seconds=audio_todo, seconds=elapsed, precision=resolved, skipped=len(skipped))


def _sample_rate(upstream: Upstream) -> int:
    return int(getattr(upstream, "sample_rate", 16000))


def _write_shard(out: Path, si: int, ids: list[str], lengths: list[int],
                 feats: dict[int, list[np.ndarray]]) -> None:
    """Write one shard into a .tmp directory, fsync everything, rename it into place.

    Raises:
        CacheError: the write failed (disk full): the partial ``.tmp`` directory is removed,
            the finished shards are kept.
    """
    final = out / _shard_name(si)
    try:
        # The fixed .tmp name lets the next run find and redo a shard a kill left half-written.
        with atomic_dir(final, tmp=out / (_shard_name(si) + ".tmp")) as tmp:
            _write_shard_files(tmp, ids, lengths, feats)
    except OSError as e:
        full = " (disk full)" if e.errno == errno.ENOSPC or "written" in str(e) else ""
        raise CacheError(f"{out / _shard_name(si)}: could not write the shard{full}: {e.strerror or e}; "
                         "the finished shards are kept: free space and run the same `aviary extract` "
                         "again to continue") from e


def _write_shard_files(tmp: Path, ids: list[str], lengths: list[int],
                       feats: dict[int, list[np.ndarray]]) -> None:
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist() if lengths else []
    sums = {}
    for k, chunks in feats.items():
        arr = np.concatenate(chunks, axis=0)  # (frames, H)
        path = tmp / f"layer-{k:02d}.npy"
        with open(path, "wb") as f:
            np.save(f, arr)
        sums[path.name] = file_sha256(path)  # of the bytes on disk, as read back
    meta = {"ids": ids, "lengths": lengths, "offsets": offsets, "frames": int(sum(lengths)), "sha256": sums}
    with open(tmp / "shard.json", "w") as f:
        json.dump(meta, f)


class FeatureCache:
    """A complete, validated cache opened memory-mapped.

    Attributes:
        path: the cache directory.
        layers: hidden-state indices stored.
        upstream: the stored :func:`describe_upstream` dict (name, params, fingerprint ...).
        frame_shift: seconds per frame.
        hidden_size: H.
        memo: per-process memo of data derived from the cache (frame labels), filled by probes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        idx_path = self.path / "index.json"
        if not idx_path.is_file():
            hint = (" (extraction was interrupted: run `aviary extract` again with the same arguments to finish it)"
                    if (self.path / "plan.json").is_file() else "")
            raise CacheError(f"{self.path}: not a complete feature cache, index.json missing{hint}")
        index = _read_json(idx_path)
        if index.get("version") not in _READABLE_VERSIONS or not index.get("complete"):
            raise CacheError(f"{idx_path}: unsupported cache version {index.get('version')!r} or incomplete")
        if index["version"] == 1:
            log.warning("%s: a version-1 cache has no checksums; its features are not verified "
                        "(extract into a new directory to get them)", self.path)
        self.index = index
        self.layers: list[int] = [int(k) for k in index["layers"]]
        self.upstream: dict[str, Any] = index["upstream"]
        self.frame_shift = float(index["frame_shift"])
        self.hidden_size = int(index["hidden_size"])
        self.dtype = index["dtype"]
        self.precision: str | None = index.get("precision")  # None: made before it was recorded
        self.memo: dict[Any, Any] = {}
        self._sums: list[dict[str, str] | None] = []
        self._verified: set[tuple[int, int]] = set()
        # utterance id -> (shard, offset, length)
        self._where: dict[str, tuple[int, int, int]] = {}
        self._durations: dict[str, float] = {}
        self._arrays: list[dict[int, np.ndarray]] = []
        for si, shard in enumerate(index["shards"]):
            sdir = self.path / _shard_name(si)
            meta = _read_json(sdir / "shard.json")
            if meta["ids"] != shard["ids"] or len(meta["lengths"]) != len(meta["ids"]):
                raise CacheError(f"{sdir}/shard.json: utterance ids disagree with {idx_path}; the cache is corrupted")
            sums = meta.get("sha256")
            if sums is None and index["version"] >= 2:
                raise CacheError(f"{sdir}/shard.json: no checksums; the cache is corrupted, extract again "
                                 "(`aviary extract` re-creates the shard)")
            self._sums.append(sums)
            arrays = {}
            for k in self.layers:
                f = sdir / f"layer-{k:02d}.npy"
                try:
                    a = np.load(f, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise CacheError(f"{f}: unreadable ({e}); the cache is corrupted, extract again") from None
                if a.shape != (meta["frames"], self.hidden_size) or a.dtype != _DTYPES[self.dtype]:
                    raise CacheError(f"{f}: shape {a.shape} dtype {a.dtype}, expected "
                                     f"({meta['frames']}, {self.hidden_size}) {self.dtype}; the cache is corrupted")
                arrays[k] = a
            self._arrays.append(arrays)
            for uid, off, n, d in zip(meta["ids"], meta["offsets"], meta["lengths"], shard["durations"]):
                self._where[uid] = (si, int(off), int(n))
                self._durations[uid] = float(d)

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    @property
    def num_hidden_states(self) -> int:
        return int(self.upstream["num_hidden_states"])

    def __contains__(self, uid: str) -> bool:
        return uid in self._where

    def length(self, uid: str) -> int:
        """Valid frames of utterance ``uid``."""
        return self._where[uid][2]

    def get(self, uid: str, layer: int) -> np.ndarray:
        """Frames of one utterance and layer, a memory-mapped view ``(T, H)``."""
        if layer not in self._arrays[0]:
            raise CacheError(f"{self.path}: layer {layer} not cached (cached layers: {self.layers})")
        si, off, n = self._where[uid]
        if (si, layer) not in self._verified:
            self._verify(si, layer)
        return self._arrays[si][layer][off: off + n]

    def _verify(self, si: int, layer: int) -> None:
        """Check a layer file against its stored checksum, once, before its first use."""
        sums = self._sums[si]
        f = self.path / _shard_name(si) / f"layer-{layer:02d}.npy"
        if sums is not None and sums.get(f.name) != file_sha256(f):
            raise CacheError(f"{f}: checksum mismatch, the cache is corrupted; run `aviary extract` again "
                             "with the same arguments (it re-creates shards that fail their check)")
        self._verified.add((si, layer))

    def get_stacked(self, uid: str, layers: Sequence[int]) -> np.ndarray:
        """Frames of several layers as float32 ``(T, len(layers), H)``."""
        return np.stack([np.asarray(self.get(uid, k), dtype=np.float32) for k in layers], axis=1)

    def check_utterances(self, utterances: Iterable[Any], tolerance: float = 1e-3) -> None:
        """Every utterance must be cached with the manifest's duration.

        Raises:
            CacheError: naming the cache, the first missing ids or the changed durations.
        """
        missing, changed = [], []
        for u in utterances:
            uid = str(u.id)
            if uid not in self._where:
                missing.append(uid)
            elif abs(self._durations[uid] - float(u.duration)) > tolerance:
                changed.append(f"{uid} ({self._durations[uid]:.3f}s cached, {float(u.duration):.3f}s now)")
        if missing:
            raise CacheError(f"{self.path}: {len(missing)} utterances of the corpus are not in the cache "
                             f"(e.g. {missing[:3]}); extract again for this corpus")
        if changed:
            raise CacheError(f"{self.path}: stale cache, {len(changed)} utterances changed duration since "
                             f"extraction (e.g. {changed[:2]}); extract again")

    def check_upstream(self, info: UpstreamInfo | dict[str, Any]) -> None:
        """The cache must come from an upstream with the same weights fingerprint."""
        d = info.to_dict() if isinstance(info, UpstreamInfo) else dict(info)
        if d.get("fingerprint") != self.upstream.get("fingerprint"):
            raise CacheError(f"{self.path}: made by upstream {self.upstream.get('name')!r} "
                             f"(fingerprint {self.upstream.get('fingerprint')}), not by {d.get('name')!r} "
                             f"(fingerprint {d.get('fingerprint')}); stale or mismatched cache")


def open_cache(path: str | os.PathLike, utterances: Iterable[Any] | None = None,
               upstream: UpstreamInfo | dict[str, Any] | None = None) -> FeatureCache:
    """Open and validate a cache (see :class:`FeatureCache`).

    Args:
        path: cache directory.
        utterances: if given, every one must be cached with an unchanged duration.
        upstream: if given, the cache must come from the same weights.
    """
    cache = FeatureCache(path)
    if utterances is not None:
        cache.check_utterances(utterances)
    if upstream is not None:
        cache.check_upstream(upstream)
    return cache
