"""Turn a corpus into vq-wav2vec token sequences (``aviary tokenize``).

Lives in ``evaluate/`` beside feature extraction because, like extraction, it composes a
trained upstream with a corpus; the on-disk format belongs to :mod:`aviary.data.tokens`.

Work happens in shards of ``shard_size`` utterances per split. Each finished shard is one
file ``raw/<split>-NNNNN.jsonl`` written atomically, so an interrupted run resumes by
skipping the shards already on disk. Once every shard exists, the vocabulary (pairs seen
in the ``train`` split, with counts) and the per-split id files are rebuilt from the raw
shards, which is cheap and makes the result independent of how often the run restarted.
Results are deterministic: the upstream runs in eval mode (argmax / nearest codeword) and a
padded batch gives the same codes as one utterance at a time.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from aviary.data.sampler import padded_batches
from aviary.data.tokens import (FORMAT, FORMAT_VERSION, META_FILE, NUM_SPECIAL, RAW_DIR, SPECIALS, UNK_ID,
                                VOCAB_FILE, TokenCorpusError, Vocabulary, pair_string,
                                read_jsonl, write_jsonl)
from aviary.audio import AudioError, load_audio
from aviary.data.manifest import load_manifest
from aviary.hub import load as load_upstream
from aviary.models.vqwav2vec import VqWav2VecUpstream
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def corpus_splits(data: str | os.PathLike) -> list[tuple[str, Any]]:
    """``(split name, utterances)`` of a corpus directory (its train/valid/test manifests) or of
    a single manifest (all of it as ``train``)."""
    p = Path(data)
    root = p if p.is_dir() else (p.parent if p.name == "manifest.jsonl" else None)
    if root is not None:
        found = [s for s in SPLITS if (root / f"{s}.jsonl").is_file()]
        if found:
            return [(s, load_manifest(root, s)) for s in found]
    return [("train", load_manifest(p))]


def _weights_fingerprint(path: str | os.PathLike) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("aviary.sha256") or f"size:{os.path.getsize(path)}"


@torch.no_grad()
def tokenize_utterances(upstream: Any, utts: Sequence[Any], batch_seconds: float = 60.0,
                        device: str | torch.device = "cpu") -> tuple[list[dict[str, Any]], dict[str, str], float]:
    """Codes of each utterance as ``{"id", "speaker", "codes": "i-j i-j ..."}`` rows, in input order.

    Args:
        upstream: a vq-wav2vec upstream (has ``tokenize(wavs, lengths)``).
        utts: :class:`~aviary.data.manifest.Utterance` list.
        batch_seconds: padded audio per forward pass.

    Returns:
        (rows, skipped: id -> reason for unreadable audio, audio seconds processed).
    """
    sr = upstream.sample_rate
    rows: list[dict[str, Any] | None] = [None] * len(utts)
    skipped: dict[str, str] = {}
    seconds = 0.0
    durations = [u.duration for u in utts]
    # Sorted by duration, so that len(batch) * longest <= batch_seconds wastes little padding.
    order = sorted(range(len(utts)), key=lambda i: durations[i])
    for batch in padded_batches(order, durations, batch_seconds):
        wavs, keep = [], []
        for i in batch:
            try:
                wavs.append(torch.from_numpy(load_audio(utts[i].audio, sr)))
                keep.append(i)
            except AudioError as e:
                log.warning("skipping %s: %s", utts[i].id, e)
                skipped[utts[i].id] = str(e)
        if not keep:
            continue
        lens = torch.tensor([w.numel() for w in wavs], dtype=torch.long)
        padded = torch.zeros(len(wavs), int(lens.max()))
        for r, w in enumerate(wavs):
            padded[r, : w.numel()] = w
        seconds += float(lens.sum()) / sr
        codes, n = upstream.tokenize(padded.to(device), lens.to(device))  # (B, T, G), (B,)
        codes, n = codes.cpu(), n.cpu()
        for r, i in enumerate(keep):
            seq = codes[r, : int(n[r])].tolist()
            rows[i] = {"id": utts[i].id, "speaker": utts[i].speaker,
                       "codes": " ".join(pair_string(c) for c in seq)}
    return [r for r in rows if r is not None], skipped, seconds


def tokenize_corpus(checkpoint: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
                    shard_size: int = 200, batch_seconds: float = 60.0,
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """Write the token corpus of ``data`` made with the vq-wav2vec run ``checkpoint`` to ``out_dir``.

    Args:
        checkpoint: vq-wav2vec run directory or weights file (anything :func:`aviary.load` takes).
        data: corpus directory (its train/valid/test splits are kept) or a manifest file.
        out_dir: the token corpus directory (layout in :mod:`aviary.data.tokens`).
        shard_size: utterances per resumable shard.
        batch_seconds: padded audio per forward pass.
        device: where the tokenizer runs.

    Returns:
        The ``meta.json`` content (splits with utterance / token counts and ``<unk>`` rate,
        vocabulary size, speed in x real time for this invocation).

    Raises:
        TokenCorpusError: ``out_dir`` holds shards made from another checkpoint or corpus.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    upstream = load_upstream(checkpoint, device=device)
    if not isinstance(upstream, VqWav2VecUpstream):
        raise TokenCorpusError(f"{checkpoint}: a {type(upstream).__name__}, not a vq-wav2vec model; "
                               "`aviary tokenize` needs a vq-wav2vec run")
    wpath = Path(upstream.checkpoint_path).resolve()
    cfg = upstream.config
    source = {"checkpoint": str(wpath), "checkpoint_sha256": _weights_fingerprint(wpath),
              "data": str(Path(data).resolve()), "shard_size": shard_size}
    raw = out / RAW_DIR
    src_file = raw / "source.json"
    if src_file.is_file():
        old = json.loads(src_file.read_text())
        if old != source:
            raise TokenCorpusError(f"{out}: its shards were made from {old}, not {source}; "
                                   "use a new --out directory")
    else:
        raw.mkdir(parents=True, exist_ok=True)
        write_text_atomic(src_file, json.dumps(source, indent=2, sort_keys=True) + "\n")

    t0 = time.perf_counter()
    done_seconds, skipped_shards, skipped_utts = 0.0, 0, {}
    splits = corpus_splits(data)
    shard_files: dict[str, list[Path]] = {}
    for split, utts in splits:
        files = []
        for k in range(0, max(len(utts), 1), shard_size):
            f = raw / f"{split}-{k // shard_size:05d}.jsonl"
            files.append(f)
            if f.is_file():
                skipped_shards += 1
                continue
            rows, skipped, secs = tokenize_utterances(upstream, utts[k: k + shard_size], batch_seconds, device)
            write_jsonl(f, rows)
            done_seconds += secs
            skipped_utts.update(skipped)
            log.info("%s: %d utterances (%.1f s of audio)", f.name, len(rows), secs)
        shard_files[split] = files
    wall = time.perf_counter() - t0
    if skipped_shards:
        log.info("resumed: %d shards were already done", skipped_shards)

    # Vocabulary from the training split (every split when there is no train split).
    rows_by_split = {s: [r for f in files for r in read_jsonl(f)] for s, files in shard_files.items()}
    counts: Counter[str] = Counter()
    for s in (["train"] if "train" in rows_by_split else list(rows_by_split)):
        for r in rows_by_split[s]:
            counts.update(r["codes"].split())
    vocab = Vocabulary.from_counts(counts)
    vocab.write(out / VOCAB_FILE)
    index = vocab.index()
    split_info = {}
    for s, rows in rows_by_split.items():
        n_tok = n_unk = 0
        id_rows = []
        for r in rows:
            ids = [index.get(p, UNK_ID) for p in r["codes"].split()]
            n_tok += len(ids)
            n_unk += sum(1 for i in ids if i == UNK_ID)
            id_rows.append({"id": r["id"], "speaker": r["speaker"], "tokens": ids})
        write_jsonl(out / f"{s}.jsonl", id_rows)
        split_info[s] = {"utterances": len(id_rows), "tokens": n_tok, "unk_fraction": n_unk / max(n_tok, 1)}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "specials": list(SPECIALS),
            "num_special": NUM_SPECIAL, "vocab_size": len(vocab), "num_groups": cfg.num_groups,
            "num_vars": cfg.num_vars, "possible_pairs": cfg.num_vars ** cfg.num_groups,
            "frame_shift": cfg.frame_shift, "model": cfg.to_dict(), **source, "splits": split_info,
            "skipped": skipped_utts,
            "speed": {"audio_seconds": done_seconds, "wall_seconds": wall,
                      "x_real_time": done_seconds / wall if wall > 0 and done_seconds else None}}
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
