"""Frame targets for HuBERT-style training: k-means of a feature stream, on disk, in batches.

HuBERT (Hsu et al. 2021, section III-A/IV-C) clusters a feature stream offline and trains on
the cluster ids: iteration 0 clusters MFCC (39-dim: 13 coefficients + deltas + delta-deltas),
iteration 1 a layer of the iteration-0 model. ``aviary targets kmeans`` does both:

    --features mfcc            MFCC, R consecutive 10 ms frames concatenated per target frame
                               (``--normalize utterance``: each utterance's MFCC CMVN'd first)
    --features CKPT:LAYER      hidden state LAYER of an aviary model (its own frame rate)

Targets sit at the ENCODER's frame rate: target frame k covers exactly the R front-end frames
that encoder frame k stacks (MFCC), or is encoder frame k of the checkpoint (a layer), so the
training batch needs no resampling; a cropped training item takes the slice starting at its
first encoder frame (crops start on encoder-frame boundaries, :class:`TargetTrainData`).

Layout of a targets directory (every file checksummed and written atomically)::

    DIR/kmeans.safetensors        centroids (K, D) + the settings and the corpus fingerprint
    DIR/shard-00000.safetensors   labels of up to SHARD utterances: ``labels`` (frames,) int32
                                  concatenated, ``lengths`` (n,); utterance ids in the config
    DIR/targets.json              written last: settings, corpus, shards with their SHA-256

A killed run is continued by running the same command again: a fitted ``kmeans.safetensors``
is reused and finished shards are kept (after checking them); a different setting or corpus in
an existing directory is refused by name.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from aviary.config import Config, ConfigError, check, check_range
from aviary import storage
from aviary.train.data import AudioTrainData

log = logging.getLogger(__name__)

TARGETS_FILE = "targets.json"
KMEANS_FILE = "kmeans.safetensors"
FORMAT_VERSION = 1
IGNORE = -100  # as aviary.objectives.hubert.IGNORE (train/ may not need the objective)
#: MFCC normalisations before k-means (see KMeansTargetsConfig.normalize).
NORMALIZE = ("none", "utterance")


@dataclass(frozen=True)
class KMeansTargetsConfig(Config):
    """Settings of ``aviary targets kmeans`` (stored with the targets).

    Attributes:
        features: ``"mfcc"`` or ``"CHECKPOINT:LAYER"``.
        clusters: K (HuBERT: 100 on MFCC, 500 on a layer).
        downsample: R for ``mfcc``: 10 ms frames per target frame (the encoder's R). For a
            layer, the checkpoint's own frame rate decides (0 there).
        seed: k-means seed.
        fit_frames: at most this many frames (a random subset of the training split's) are
            clustered; every utterance is then labelled.
        batch_size: MiniBatchKMeans batch (fairseq's HuBERT recipe: 10000).
        n_init: k-means++ initialisations tried (fairseq: 20).
        max_iter: passes over the fit frames (fairseq: 100).
        shard_utterances: utterances per labels file.
        normalize: ``mfcc`` only: ``"none"`` (fairseq's HuBERT recipe, made for clean
            LibriSpeech) or ``"utterance"``: every utterance's 39-dim MFCC is mean- and
            variance-normalised over its own frames before stacking and clustering, as the
            encoder's input is (``cmvn="utterance"``), so the clusters follow the frame, not the
            utterance's noise floor and channel. Measured on the demo's noisy corpus
            (``benchmarks/bench_hubert_targets.py``, BENCHMARKS.md "Take-off: masked prediction").
    """

    features: str = "mfcc"
    clusters: int = 100
    downsample: int = 1
    seed: int = 0
    fit_frames: int = 200_000
    batch_size: int = 10_000
    n_init: int = 20
    max_iter: int = 100
    shard_utterances: int = 256
    normalize: str = "none"

    def validate(self) -> None:
        check(self.features == "mfcc" or _layer_spec(self.features) is not None, "features", self.features,
              "'mfcc' or 'CHECKPOINT:LAYER' (LAYER an integer)")
        check_range("clusters", self.clusters, 2)
        check_range("downsample", self.downsample, 1 if self.features == "mfcc" else 0)
        check_range("seed", self.seed, 0)
        check_range("fit_frames", self.fit_frames, 2)
        check_range("batch_size", self.batch_size, 1)
        check_range("n_init", self.n_init, 1)
        check_range("max_iter", self.max_iter, 1)
        check_range("shard_utterances", self.shard_utterances, 1)
        check(self.normalize in NORMALIZE, "normalize", self.normalize, " or ".join(map(repr, NORMALIZE)))
        check(self.normalize == "none" or self.features == "mfcc", "normalize", self.normalize,
              "'none' for a checkpoint's layer (only MFCC targets are normalised)")


def _layer_spec(spec: str) -> tuple[str, int] | None:
    path, sep, layer = spec.rpartition(":")
    if not sep or not path or not layer.lstrip("-").isdigit() or int(layer) < 0:
        return None
    return path, int(layer)


# Features


def dct_matrix(n_mels: int, n_ceps: int) -> torch.Tensor:
    """Orthonormal DCT-II basis (n_mels, n_ceps): ``mfcc = logmel @ dct`` (Kaldi, librosa)."""
    n = torch.arange(n_mels, dtype=torch.float64)[:, None]
    k = torch.arange(n_ceps, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi / n_mels * (n + 0.5) * k) * math.sqrt(2.0 / n_mels)
    basis[:, 0] /= math.sqrt(2.0)
    return basis.float()


class MfccFeatures:
    """39-dim MFCC (13 + deltas + delta-deltas, 40 mel bins, 25 / 10 ms), R frames stacked.

    ``__call__(wavs (B, N), lengths (B,)) -> (feats (B, T', 39 R), lengths (B,))`` with
    ``T' = ceil(T / R)``, exactly as the encoder stacks its input frames (``stack_frames``).
    ``normalize="utterance"``: each row's 39-dim frames are mean- and variance-normalised over
    its own valid frames before stacking (targets are made from whole utterances); ``"none"``:
    a crop's frames equal the same frames of the whole utterance.
    """

    def __init__(self, downsample: int, normalize: str = "none") -> None:
        from aviary.features import FrontEndConfig, build_frontend

        self.frontend = build_frontend(FrontEndConfig(kind="logmel", n_mels=40, normalize_db=-25.0))
        if normalize not in NORMALIZE:
            raise ConfigError(f"normalize: {normalize!r}, expected " + " or ".join(map(repr, NORMALIZE)))
        self.R = downsample
        self.normalize = normalize
        self.dct = dct_matrix(40, 13)
        self.frame_shift = self.frontend.frame_shift * downsample

    @torch.no_grad()
    def __call__(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from aviary.features.spectral import deltas, masked_mean_std
        from aviary.models.encoder import stack_frames

        logmel, flen = self.frontend(wavs, lengths)  # (B, T, 40)
        c = logmel @ self.dct  # (B, T, 13)
        d1 = deltas(c, flen)
        feats = torch.cat([c, d1, deltas(d1, flen)], dim=-1)  # (B, T, 39)
        if self.normalize == "utterance":
            mean, std = masked_mean_std(feats, flen, unbiased=True)
            feats = (feats - mean) / (std + 1e-5)
        return stack_frames(feats, flen, self.R)


class LayerFeatures:
    """Hidden state ``layer`` of a loaded upstream, at the upstream's frame rate.

    The upstream is loaded by the caller (``aviary.load``: the CLI), so this module stays
    below the loading layer.
    """

    def __init__(self, upstream: Any, layer: int, name: str = "the model") -> None:
        if layer >= upstream.num_hidden_states:
            raise ConfigError(f"--features {name}:{layer}: the model has hidden states 0.."
                              f"{upstream.num_hidden_states - 1}")
        self.upstream = upstream
        self.layer = layer
        self.frame_shift = float(upstream.frame_shift)

    @torch.no_grad()
    def __call__(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hs, out_len = self.upstream.extract(wavs, lengths, max_layer=self.layer)[:2]
        return hs[self.layer].float(), out_len


def build_features(cfg: KMeansTargetsConfig, upstream: Any = None) -> MfccFeatures | LayerFeatures:
    """The feature stream of ``cfg``; ``upstream`` is the loaded ``CHECKPOINT`` of a layer spec."""
    if cfg.features == "mfcc":
        return MfccFeatures(cfg.downsample, cfg.normalize)
    path, layer = _layer_spec(cfg.features)
    if upstream is None:
        raise ConfigError(f"--features {cfg.features}: pass the loaded upstream of {path} (aviary.load)")
    return LayerFeatures(upstream, layer, path)


def corpus_fingerprint(utts: Sequence[Any]) -> str:
    """SHA-256 over the utterances' ids and durations (order-free): which corpus targets fit."""
    h = hashlib.sha256()
    for uid, dur in sorted((u.id, round(float(u.duration), 4)) for u in utts):
        h.update(f"{uid}\t{dur:.4f}\n".encode())
    return h.hexdigest()


def _feature_batches(utts: Sequence[Any], features, batch: int = 8):
    """(utterance slice, [per-utterance (T_i, D) float32 numpy]) for every batch of utterances."""
    from aviary.audio import load_audio
    from aviary.data.dataset import collate_audio

    for i in range(0, len(utts), batch):
        part = utts[i:i + batch]
        items = [{"id": u.id, "speaker": u.speaker, "wav": torch.from_numpy(load_audio(u.audio, 16000))}
                 for u in part]
        b = collate_audio(items)
        feats, lengths = features(b["wavs"], b["wav_lengths"])
        yield part, [feats[k, :int(lengths[k])].numpy().astype(np.float32) for k in range(len(part))]


# Writing


def _settings(cfg: KMeansTargetsConfig, frame_shift: float, fingerprint: str) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "frame_shift": frame_shift, "corpus_sha256": fingerprint,
            "format_version": FORMAT_VERSION}


def _refuse_other(out: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    # Targets written before a setting existed hold its default (``normalize``: "none").
    stored = {**stored, "config": {**KMeansTargetsConfig().to_dict(), **(stored.get("config") or {})}}
    diff = [k for k in ("config", "frame_shift", "corpus_sha256") if stored.get(k) != wanted.get(k)]
    if diff:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in diff)
        raise ConfigError(f"{out}: holds targets of other settings or another corpus ({detail}); "
                          "choose another --out or delete that directory")


def fit_kmeans(feats: np.ndarray, cfg: KMeansTargetsConfig) -> np.ndarray:
    """Centroids (K, D) float32 of scikit-learn's ``MiniBatchKMeans`` (fairseq HuBERT's settings)."""
    from sklearn.cluster import MiniBatchKMeans

    if feats.shape[0] < cfg.clusters:
        raise ConfigError(f"--clusters {cfg.clusters}: only {feats.shape[0]} frames to cluster; "
                          "use fewer clusters or more data")
    km = MiniBatchKMeans(n_clusters=cfg.clusters, init="k-means++", max_iter=cfg.max_iter,
                         batch_size=cfg.batch_size, tol=0.0, max_no_improvement=100, n_init=cfg.n_init,
                         reassignment_ratio=0.0, random_state=cfg.seed)
    km.fit(feats.astype(np.float64))
    return km.cluster_centers_.astype(np.float32)


def assign(feats: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (squared Euclidean) of every row: (T, D) -> (T,) int32, in float64."""
    f = torch.from_numpy(feats).double()
    c = torch.from_numpy(centroids).double()
    d = (f * f).sum(1, keepdim=True) - 2 * f @ c.T + (c * c).sum(1)[None]
    return d.argmin(1).numpy().astype(np.int32)


def make_kmeans_targets(data: str | os.PathLike, out: str | os.PathLike, cfg: KMeansTargetsConfig,
                        upstream: Any = None, progress: bool = False) -> Path:
    """Fit k-means on a corpus's training split and label every utterance (resumable).

    Args:
        data: corpus directory (fit on ``train.jsonl`` when there is one; every utterance of
            ``manifest.jsonl`` labelled) or a manifest file (fit on and label all of it).
        out: the targets directory (see the module docstring).
        cfg: settings.
        upstream: for ``features="CHECKPOINT:LAYER"``, that checkpoint loaded (``aviary.load``).
        progress: show a progress bar.

    Returns:
        ``out/targets.json``.
    """
    from aviary.data.manifest import load_manifest

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a targets directory")
    dp = Path(data)
    utts = load_manifest(dp)
    if not utts:
        raise ConfigError(f"{data}: the corpus holds no utterance")
    fit_utts = load_manifest(dp, "train") if dp.is_dir() and (dp / "train.jsonl").is_file() else utts
    features = build_features(cfg, upstream)
    wanted = _settings(cfg, features.frame_shift, corpus_fingerprint(utts))
    final = out / TARGETS_FILE
    if final.is_file():
        _refuse_other(out, storage.read_json(final), wanted)
        log.info("%s: complete already", final)
        return final
    out.mkdir(parents=True, exist_ok=True)

    km_path = out / KMEANS_FILE
    centroids = None
    if km_path.is_file():
        try:
            t, meta = storage.load_tensors(km_path)
            _refuse_other(out, storage.load_config_from_metadata(km_path, meta), wanted)
            centroids = t["centroids"].numpy()
            log.info("%s: reusing the fitted centroids", km_path)
        except storage.CheckpointError as e:
            log.warning("%s is damaged (%s): fitting again", km_path, e)
    if centroids is None:
        rng = np.random.default_rng(cfg.seed)
        chunks = [f for _, fs in _feature_batches(fit_utts, features) for f in fs]
        allf = np.concatenate(chunks)
        if allf.shape[0] > cfg.fit_frames:
            allf = allf[np.sort(rng.choice(allf.shape[0], cfg.fit_frames, replace=False))]
        log.info("fitting %d clusters on %d frames of %d-dim %s", cfg.clusters, allf.shape[0], allf.shape[1],
                 cfg.features)
        centroids = fit_kmeans(allf, cfg)
        storage.save_tensors(km_path, {"centroids": torch.from_numpy(centroids)}, config=wanted)

    shards = []
    n_shards = math.ceil(len(utts) / cfg.shard_utterances)
    for s in range(n_shards):
        part = utts[s * cfg.shard_utterances:(s + 1) * cfg.shard_utterances]
        path = out / f"shard-{s:05d}.safetensors"
        ids = [u.id for u in part]
        if path.is_file():
            try:
                _, meta = storage.load_tensors(path)
                if storage.load_config_from_metadata(path, meta).get("ids") == ids:
                    shards.append({"file": path.name, "sha256": storage.file_sha256(path), "utterances": len(ids)})
                    continue
            except storage.CheckpointError as e:
                log.warning("%s is damaged (%s): labelling it again", path, e)
        labels, lengths = [], []
        for _, fs in _feature_batches(part, features):
            for f in fs:
                labels.append(assign(f, centroids))
                lengths.append(len(f))
        storage.save_tensors(path, {"labels": torch.from_numpy(np.concatenate(labels)),
                                 "lengths": torch.tensor(lengths, dtype=torch.long)},
                          config={"ids": ids, "corpus_sha256": wanted["corpus_sha256"]})
        shards.append({"file": path.name, "sha256": storage.file_sha256(path), "utterances": len(ids)})
        log.info("labelled shard %d of %d", s + 1, n_shards)
    storage.write_json_atomic(final, {**wanted, "clusters": cfg.clusters, "data": str(data),
                                   "num_utterances": len(utts), "kmeans_sha256": storage.file_sha256(km_path),
                                   "shards": shards})
    return final


# Reading


class FrameTargets:
    """A finished targets directory, every file checked against the checksums it lists.

    Attributes:
        path: the directory; ``info``: ``targets.json``; ``clusters``; ``frame_shift`` (s).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        final = self.path / TARGETS_FILE
        if not final.is_file():
            hint = (" (an unfinished run: run the same `aviary targets kmeans` command again)"
                    if (self.path / KMEANS_FILE).is_file() else "")
            raise ConfigError(f"--targets {self.path}: no {TARGETS_FILE}{hint}; make targets with "
                              "`aviary targets kmeans --data CORPUS --out DIR`")
        self.info = storage.read_json(final)
        if self.info.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{final}: targets format {self.info.get('format_version')!r}, "
                              f"this aviary reads {FORMAT_VERSION}")
        self.clusters = int(self.info["clusters"])
        self.frame_shift = float(self.info["frame_shift"])
        self.sha256 = storage.file_sha256(final)
        self._labels: dict[str, np.ndarray] = {}
        for sh in self.info["shards"]:
            p = self.path / sh["file"]
            if not p.is_file() or storage.file_sha256(p) != sh["sha256"]:
                raise storage.CheckpointError(f"{p}: missing or changed since {final} was written "
                                           "(its SHA-256 differs); make the targets again")
            t, meta = storage.load_tensors(p)
            ids = storage.load_config_from_metadata(p, meta)["ids"]
            ends = np.cumsum(t["lengths"].numpy())
            lab = t["labels"].numpy()
            for uid, a, b in zip(ids, np.concatenate([[0], ends[:-1]]), ends):
                self._labels[uid] = lab[a:b]

    def __contains__(self, uid: str) -> bool:
        return uid in self._labels

    def labels(self, uid: str) -> np.ndarray:
        """(frames,) int32 cluster ids of utterance ``uid`` at ``frame_shift``."""
        return self._labels[uid]

    def check_corpus(self, utts: Sequence[Any], data: Any) -> None:
        """Refuse a corpus the targets were not made for, naming both.

        Every utterance must have targets, of as many frames as its duration gives at
        ``frame_shift`` (within 2 frames: centred STFT and the last partial group).
        """
        theirs = f"{self.path} (made for {self.info.get('data')}, {self.info.get('num_utterances')} utterances)"
        missing = [u.id for u in utts if u.id not in self._labels]
        if missing:
            raise ConfigError(f"--targets {theirs} do not match --data {data}: {len(missing)} of {len(utts)} "
                              f"utterances have no targets (e.g. {missing[:3]}); make targets for this corpus "
                              "with `aviary targets kmeans`")
        bad = [(u.id, len(self._labels[u.id]), u.duration / self.frame_shift) for u in utts
               if abs(len(self._labels[u.id]) - u.duration / self.frame_shift) > 2]
        if bad:
            uid, n, want = bad[0]
            raise ConfigError(f"--targets {theirs} do not match --data {data}: {len(bad)} utterances have "
                              f"another length (e.g. {uid}: {n} target frames, its audio {want:.1f} frames of "
                              f"{self.frame_shift * 1000:.0f} ms); the audio changed or the targets are of "
                              "another corpus")


def model_frame_shift(model_cfg: Any) -> float:
    """Seconds per encoder frame of a MAM-style pretraining config (front-end hop x R)."""
    fe = model_cfg.input
    return fe.hop_length / fe.sample_rate * model_cfg.encoder.downsample


class TargetTrainData(AudioTrainData):
    """Audio with frame targets: crops start on encoder-frame boundaries and carry their slice.

    The batch gains ``targets`` (B, T_t) long at the encoder frame rate, :data:`IGNORE` past
    each row's end (see :func:`aviary.objectives.hubert.align_targets`).

    Args:
        utts, **kw: as :class:`AudioTrainData`.
        targets: the :class:`FrameTargets` (checked against ``utts``).
        data: how the corpus is named in errors.
    """

    def __init__(self, utts: Sequence[Any], targets: FrameTargets, data: Any, **kw: Any) -> None:
        super().__init__(utts, **kw)
        targets.check_corpus(self.utts, data)
        self.targets = targets

    def crop_offset(self, u: Any, seed: int) -> float:
        # A whole number of encoder frames, so target k of the crop is target j + k of the file.
        shift = self.targets.frame_shift
        j = int(super().crop_offset(u, seed) / shift)
        return j * shift

    def load_item(self, index: int, seed: int) -> dict[str, Any] | None:
        item = super().load_item(index, seed)
        if item is None:
            return None
        u = self.utts[index]
        j = round(self.crop_offset(u, seed) / self.targets.frame_shift)
        n = math.ceil(item["wav"].numel() / self.sample_rate / self.targets.frame_shift) + 2
        item["targets"] = torch.from_numpy(self.targets.labels(u.id)[j:j + n].astype(np.int64))
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(items)
        kept = [it for it in items if it is not None]
        T = max((it["targets"].numel() for it in kept), default=0)
        t = torch.full((len(kept), T), IGNORE, dtype=torch.long)
        for row, it in enumerate(kept):
            t[row, :it["targets"].numel()] = it["targets"]
        batch["targets"] = t
        return batch

    def configure_model(self, model_cfg: Any) -> Any:
        """The model config with K and the targets' fingerprint set; another frame rate is refused."""
        shift = model_frame_shift(model_cfg)
        if abs(shift - self.targets.frame_shift) > 1e-9:
            raise ConfigError(f"--targets {self.targets.path} are at {self.targets.frame_shift * 1000:g} ms frames, "
                              f"the model's encoder frames are {shift * 1000:g} ms (R={model_cfg.encoder.downsample}); "
                              "make targets with a matching --downsample")
        kcfg = self.targets.info.get("config", {})
        made, meant = kcfg.get("normalize", "none"), getattr(model_cfg.objective, "mfcc_normalize", None)
        if kcfg.get("features") == "mfcc" and meant is not None and made != meant:
            log.warning("--targets %s: MFCC clustered with normalize=%r, but this model's iteration-0 targets "
                        "are meant to be %r (objective.mfcc_normalize); training on them anyway (make them with "
                        "`aviary targets kmeans --normalize %s`)", self.targets.path, made, meant, meant)
        obj = model_cfg.objective.replace(num_clusters=self.targets.clusters, targets_sha256=self.targets.sha256)
        return model_cfg.replace(objective=obj.to_dict())


def build_target_train_data(data_path: str | Path, split: str | None, train_cfg: Any, model_cfg: Any
                            ) -> TargetTrainData:
    """:class:`TargetTrainData` of a split for a config whose objective has a ``targets`` directory."""
    from aviary.data.manifest import load_manifest

    where = model_cfg.objective.targets
    if not where:
        raise ConfigError(f"the {model_cfg.objective.name} objective trains on frame targets: pass --targets DIR "
                          "(made by `aviary targets kmeans --features mfcc --data CORPUS --out DIR`)")
    targets = FrameTargets(where)
    utts = load_manifest(data_path, split)
    return TargetTrainData(utts, targets, data_path, max_batch_seconds=train_cfg.max_batch_seconds,
                           crop_seconds=train_cfg.crop_seconds, min_seconds=train_cfg.min_seconds)


def with_mfcc_targets(model_cfg: Any, data: str | os.PathLike, out: str | os.PathLike, clusters: int | None = None,
                      seed: int = 0, normalize: str | None = None) -> Any:
    """``model_cfg`` trained on MFCC k-means targets of ``data`` at its encoder's frame rate
    (HuBERT's iteration 0), made in ``out`` unless they are there already; configs whose
    objective takes no targets are returned as they are. What the demo and the benchmarks call.

    ``clusters`` and ``normalize`` default to the objective's ``num_clusters`` and
    ``mfcc_normalize`` (``hubert-cpu``: K = 100, per-utterance CMVN; ``hubert-base``: K = 100,
    none, as published).
    """
    obj = getattr(model_cfg, "objective", None)
    if not hasattr(obj, "targets"):
        return model_cfg
    R = round(model_frame_shift(model_cfg) / (model_cfg.input.hop_length / model_cfg.input.sample_rate))
    clusters = obj.num_clusters if clusters is None else clusters
    normalize = getattr(obj, "mfcc_normalize", "none") if normalize is None else normalize
    make_kmeans_targets(data, out, KMeansTargetsConfig(features="mfcc", clusters=clusters, downsample=R, seed=seed,
                                                       normalize=normalize))
    return model_cfg.replace(objective={**obj.to_dict(), "targets": str(Path(out).resolve())})


def targets_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A short description of a targets directory (for logs and the CLI)."""
    t = FrameTargets(path)
    return {"path": str(t.path), "clusters": t.clusters, "frame_shift": t.frame_shift,
            "utterances": len(t._labels), "features": t.info["config"]["features"], "sha256": t.sha256}


def unigram_level(run_dir: str | os.PathLike, corpus: str | os.PathLike, max_utterances: int = 600
                  ) -> dict[str, float]:
    """The plateau of a masked-prediction run (BEST-RQ codes, k-means targets) over the whole
    validation split: the cross-entropy of the validation frames' codes under their frequencies
    on the training split (what a model that ignores the audio learns; train counts smoothed by
    +0.5), the accuracy of always answering the commonest code, and the validation entropy.

    The loop's per-batch ``unigram_ce`` is the entropy of one batch's ~200 masked frames: biased
    low (4.05 nats against 4.96 over the split for BEST-RQ's 512 codes), too low to judge
    take-off by. Codes: the run's ``objective.targets`` when it has them, else its own frozen
    quantiser on the first codebook (``max_utterances`` training utterances at most).
    """
    from aviary.data.manifest import load_manifest
    from aviary.models.registry import build_pretrain, config_from_dict
    from aviary.train.checkpoint import find_weights

    train = load_manifest(corpus, "train")[:max_utterances]
    valid = load_manifest(corpus, "valid")
    wpath = find_weights(Path(run_dir))
    tensors, meta = storage.load_tensors(wpath)
    mcfg = config_from_dict(storage.load_config_from_metadata(wpath, meta)["model"])
    obj = mcfg.objective
    if getattr(obj, "targets", None):
        t = FrameTargets(obj.targets)
        codes = {split: np.concatenate([t.labels(u.id) for u in utts]) for split, utts in
                 (("train", train), ("valid", valid))}
        K = t.clusters
    elif hasattr(obj, "codebook_size"):
        model = build_pretrain(mcfg)
        model.load_state_dict(tensors)
        model.eval()
        K = obj.codebook_size

        @torch.no_grad()
        def first_codes(wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats, flen = model.upstream.features(wavs, lengths)
            stacked, slen = model.upstream.encoder.stack(feats, flen)
            return model.objective.quantizer(stacked)[..., :1], slen  # (B, T', 1): the first codebook

        codes = {split: np.concatenate([f[:, 0] for _, fs in _feature_batches(utts, first_codes, batch=16)
                                        for f in fs]).astype(np.int64)
                 for split, utts in (("train", train), ("valid", valid))}
    else:
        raise ValueError(f"{run_dir}: its objective predicts no codes (no targets, no codebook)")
    p_train = (np.bincount(codes["train"], minlength=K) + 0.5) / (len(codes["train"]) + 0.5 * K)
    p_valid = np.bincount(codes["valid"], minlength=K) / len(codes["valid"])
    nz = p_valid > 0
    return {"unigram_ce_valid_under_train": float(-np.log(p_train[codes["valid"]]).mean()),
            "unigram_acc_valid": float((codes["valid"] == p_train.argmax()).mean()),
            "valid_entropy": float(-(p_valid[nz] * np.log(p_valid[nz])).sum()),
            "codes_used_valid": int(nz.sum()), "codes": K}
