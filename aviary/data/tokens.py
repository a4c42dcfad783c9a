"""Token corpora: discrete vq-wav2vec codes of every utterance, their vocabulary, datasets.

A token corpus is a directory written by ``aviary tokenize`` (:mod:`aviary.evaluate.tokenize`)::

    TOKENS_DIR/meta.json          format, source corpus, tokenizer checkpoint + config, splits
    TOKENS_DIR/vocab.txt          one "i-j count" line per token, in id order (fairseq dict format)
    TOKENS_DIR/train.jsonl        {"id", "speaker", "tokens": [int ids]} per utterance
    TOKENS_DIR/valid.jsonl        (each split of the source corpus, when it has splits)
    TOKENS_DIR/raw/<split>-00000.jsonl   per-shard codes "i-j i-j ..." (resumable work files)

Ids: the special tokens come first (:data:`SPECIALS`: ``<pad>`` 0, ``<unk>`` 1, ``<mask>`` 2),
then the observed group pairs sorted by count (most frequent first), ties by pair. The
vocabulary is built from the ``train`` split only, so valid/test pairs never seen in
training map to ``<unk>`` exactly as they would for a model trained on it.

A split file is named like a manifest split (``train.jsonl``), so the pretraining loop's
"a directory with train.jsonl has splits" rule applies to token corpora unchanged.

This module knows nothing of models: codes are plain integers here.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from aviary.data.sampler import mix_seed, padded_batches
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<unk>", "<mask>")
"""Special tokens, with ids 0, 1, 2: padding (never a target, ignored by attention), unknown
(pairs missing from the vocabulary), mask (the [MASK] input of masked LM)."""
PAD_ID, UNK_ID, MASK_ID = 0, 1, 2
NUM_SPECIAL = len(SPECIALS)
FORMAT = "aviary-tokens"
FORMAT_VERSION = 1
META_FILE, VOCAB_FILE, RAW_DIR = "meta.json", "vocab.txt", "raw"


class TokenCorpusError(ValueError):
    """A token corpus is missing, malformed or inconsistent; the message names the file."""


def pair_string(codes: Sequence[int]) -> str:
    """Group indices (i, j) -> the token string ``"i-j"``."""
    return "-".join(str(int(c)) for c in codes)


def parse_pair(s: str, num_groups: int | None = None) -> tuple[int, ...]:
    """``"i-j"`` -> (i, j); checks the number of groups when given."""
    try:
        out = tuple(int(x) for x in s.split("-"))
    except ValueError:
        raise TokenCorpusError(f"token {s!r} is not of the form 'i-j'") from None
    if num_groups is not None and len(out) != num_groups:
        raise TokenCorpusError(f"token {s!r} has {len(out)} groups, expected {num_groups}")
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Observed group pairs with counts; ``pairs[k]`` has id ``NUM_SPECIAL + k``."""

    pairs: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> "Vocabulary":
        """Deterministic ids: by count descending, then by the pair's group indices."""
        order = sorted(counts, key=lambda p: (-counts[p], parse_pair(p)))
        return cls(tuple(order), tuple(int(counts[p]) for p in order))

    def __len__(self) -> int:
        """Number of ids including the specials (the model's vocabulary size)."""
        return NUM_SPECIAL + len(self.pairs)

    def index(self) -> dict[str, int]:
        return {p: NUM_SPECIAL + k for k, p in enumerate(self.pairs)}

    def encode(self, pairs: Iterable[str]) -> list[int]:
        """Token strings -> ids (``UNK_ID`` for pairs not in the vocabulary)."""
        idx = self.index()
        return [idx.get(p, UNK_ID) for p in pairs]

    def code_table(self, num_groups: int, num_vars: int) -> torch.Tensor:
        """(num_vars ** num_groups,) long: flat code ``sum_g c_g * V^(G-1-g)`` -> id (unk if unseen)."""
        table = torch.full((num_vars ** num_groups,), UNK_ID, dtype=torch.long)
        for k, p in enumerate(self.pairs):
            flat = 0
            for c in parse_pair(p, num_groups):
                if not 0 <= c < num_vars:
                    raise TokenCorpusError(f"token {p!r}: index {c} outside [0, {num_vars})")
                flat = flat * num_vars + c
            table[flat] = NUM_SPECIAL + k
        return table

    def write(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, "".join(f"{p} {c}\n" for p, c in zip(self.pairs, self.counts)))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise TokenCorpusError(f"{path}: vocabulary file not found")
        pairs, counts = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise TokenCorpusError(f"{path}:{n}: expected 'i-j count', got {line!r}")
            parse_pair(parts[0])
            pairs.append(parts[0])
            counts.append(int(parts[1]))
        return cls(tuple(pairs), tuple(counts))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as JSON lines, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise TokenCorpusError(f"{path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TokenCorpusError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def read_meta(tokens_dir: str | os.PathLike) -> dict[str, Any]:
    """The corpus's ``meta.json`` (checked to be an aviary token corpus)."""
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise TokenCorpusError(f"{tokens_dir}: not a token corpus (no {META_FILE}); make one with `aviary tokenize`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise TokenCorpusError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise TokenCorpusError(f"{path}: written by a newer aviary (version {meta['version']})")
    return meta


@dataclass(frozen=True)
class TokenSequence:
    """One utterance as token ids."""

    id: str
    speaker: str
    tokens: np.ndarray  # (T,) int64


def _tokens_root(path: str | os.PathLike) -> Path:
    """A token corpus directory, or the directory of one of its split files."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def read_token_split(tokens_dir: str | os.PathLike, split: str | None = "train") -> list[TokenSequence]:
    """Token sequences of one split (``None``: the train split, or a split file's own path).

    Args:
        tokens_dir: token corpus directory (or one of its ``<split>.jsonl`` files).
        split: ``train``, ``valid``, ``test``.
    """
    p = Path(tokens_dir)
    if p.is_file():
        f = p if split is None else p.parent / f"{split}.jsonl"
    else:
        f = p / f"{split or 'train'}.jsonl"
    if not f.is_file():
        raise TokenCorpusError(f"{_tokens_root(p)}: token corpus has no split file {f.name}")
    out = []
    for n, r in enumerate(read_jsonl(f), 1):
        try:
            out.append(TokenSequence(str(r["id"]), str(r.get("speaker", "")), np.asarray(r["tokens"], dtype=np.int64)))
        except KeyError as e:
            raise TokenCorpusError(f"{f}:{n}: missing key {e}") from None
    return out


def collate_tokens(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad token sequences into a batch.

    Args:
        items: dicts with ``tokens`` ((T,) long tensor or array) and optionally ``id``.

    Returns:
        ``{"tokens": (B, T) long padded with PAD_ID, "lengths": (B,) long, "ids": list[str]}``.
    """
    seqs = [torch.as_tensor(it["tokens"], dtype=torch.long) for it in items]
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), PAD_ID, dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : s.numel()] = s
    return {"tokens": tokens, "lengths": lengths, "ids": [str(it.get("id", "")) for it in items]}


def random_crop(tokens: np.ndarray, max_length: int | None, seed: int) -> np.ndarray:
    """A window of at most ``max_length`` tokens at a start drawn from ``seed`` (pure)."""
    if max_length is None or tokens.shape[0] <= max_length:
        return tokens
    start = int(np.random.default_rng(seed).integers(0, tokens.shape[0] - max_length + 1))
    return tokens[start: start + max_length]


class TokenDataset(torch.utils.data.Dataset):
    """Token sequences of one split, for a plain ``DataLoader`` (use :func:`collate_tokens`).

    Args:
        seqs: the sequences.
        max_length: crop longer sequences to a random window of this many tokens.
        seed: crops are a pure function of ``(seed, epoch, index)``; call :meth:`set_epoch`.
    """

    def __init__(self, seqs: Sequence[TokenSequence], max_length: int | None = None, seed: int = 0):
        self.seqs = list(seqs)
        self.max_length, self.seed, self.epoch = max_length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.seqs[i]
        toks = random_crop(s.tokens, self.max_length, mix_seed(self.seed, self.epoch, i))
        return {"id": s.id, "speaker": s.speaker, "tokens": torch.from_numpy(np.ascontiguousarray(toks))}


def make_token_dataset(tokens_dir: str | os.PathLike, split: str | None = "train",
                       max_length: int | None = None, seed: int = 0) -> TokenDataset:
    """The :class:`TokenDataset` of ``split`` of a token corpus (``aviary tokenize`` output)."""
    return TokenDataset(read_token_split(tokens_dir, split), max_length, seed)


def token_batches(lengths: Sequence[int], max_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-sorted batches whose padded size ``B * max(T)`` stays within ``max_tokens``.

    Sorting by length (random tie-break) keeps padding small; the batch order is shuffled.
    A pure function of ``(lengths, max_tokens, seed, epoch)``.
    """
    rng = np.random.default_rng(mix_seed(seed, epoch))
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((rng.random(len(lens)), lens))
    batches = padded_batches(order.tolist(), lens.tolist(), max_tokens)
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


class TokenTrainData:
    """A token split as the pretraining loop uses it (the ``TrainData`` interface of
    :mod:`aviary.train.data`, by duck typing: ``data/`` does not import ``train/``).

    Args:
        seqs: the split's sequences.
        max_batch_tokens: padded tokens per micro-batch.
        max_length: random crop length (the model's ``max_positions``).
        tokens_dir: the corpus directory (for :meth:`model_settings`).
    """

    unit = "tok"

    def __init__(self, seqs: Sequence[TokenSequence], max_batch_tokens: int, max_length: int | None,
                 tokens_dir: str | os.PathLike | None = None):
        self.seqs = [s for s in seqs if s.tokens.shape[0] > 0]
        self.max_batch_tokens = max_batch_tokens
        self.max_length = max_length
        self.tokens_dir = None if tokens_dir is None else Path(tokens_dir)
        cap = max_length or max((s.tokens.shape[0] for s in self.seqs), default=0)
        if max_batch_tokens < cap:
            raise TokenCorpusError(f"max_batch_tokens={max_batch_tokens} is smaller than one cropped "
                                   f"sequence ({cap} tokens); raise train.max_batch_tokens")
        self.lengths = [min(s.tokens.shape[0], cap) for s in self.seqs]

    @classmethod
    def from_path(cls, data_path: str | os.PathLike, split: str | None, train_cfg: Any,
                  model_cfg: Any) -> "TokenTrainData":
        """Open ``split`` of a token corpus; crops to ``model_cfg.max_positions`` when it has one."""
        seqs = read_token_split(data_path, split)
        return cls(seqs, int(train_cfg.max_batch_tokens), getattr(model_cfg, "max_positions", None),
                   _tokens_root(data_path))

    def model_settings(self) -> dict[str, Any]:
        """Model config values the corpus determines: ``vocab_size``, ``tokens_dir``, ``tokenizer``.

        A token model's config takes them with ``cfg.replace(**settings)``; see
        :func:`aviary.models.token_bert.configure_from_tokens`.
        """
        if self.tokens_dir is None:
            return {}
        meta = read_meta(self.tokens_dir)
        return {"vocab_size": int(meta["vocab_size"]), "tokens_dir": str(self.tokens_dir.resolve()),
                "tokenizer": meta["model"]}

    def configure_model(self, model_cfg: Any) -> Any:
        """``model_cfg`` with the corpus-determined settings filled in (fields it lacks are skipped)."""
        settings = {k: v for k, v in self.model_settings().items() if hasattr(model_cfg, k)}
        return model_cfg.replace(**settings) if settings else model_cfg

    def __len__(self) -> int:
        return len(self.seqs)

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        return token_batches(self.lengths, self.max_batch_tokens, seed, epoch)

    def load_item(self, index: int, seed: int) -> dict[str, Any]:
        s = self.seqs[index]
        toks = random_crop(s.tokens, self.max_length, seed)
        return {"id": s.id, "speaker": s.speaker, "tokens": torch.from_numpy(np.ascontiguousarray(toks))}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_tokens(items)

    def batch_amount(self, batch: dict[str, Any]) -> float:
        return float(batch["lengths"].sum())
