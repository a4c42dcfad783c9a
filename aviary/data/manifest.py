"""Manifests: one JSON object per line describing one utterance, and corpus directories.

A manifest line (keys in this order when aviary writes it)::

    {"id": "1034-121119-0000", "audio": "1034/121119/1034-121119-0000.flac", "duration": 3.42,
     "sample_rate": 16000, "speaker": "1034", "text": "THE CAT SAT",
     "phones": [["sil", 0.0, 0.21], ["DH", 0.21, 0.27], ...], "keyword": null}

``audio`` is absolute or relative to the manifest file's directory; :func:`read_manifest`
returns absolute paths. ``phones`` are (symbol, start, end) in seconds, symbols from
:data:`aviary.data.phones.PHONES`, sorted and non-overlapping. Unknown keys are an error (a
misspelt ``speeker`` would otherwise silently drop every speaker label).

A corpus directory (written by ``aviary synth`` / ``aviary prepare``) holds::

    manifest.jsonl                       every utterance
    train.jsonl valid.jsonl test.jsonl   8:1:1 utterance-level split (every speaker in each)
    train-spk.jsonl valid-spk.jsonl test-spk.jsonl   8:1:1 speaker-disjoint split
    README                               how it was made

and :func:`load_manifest` accepts either the directory or a single manifest file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from aviary.data.phones import PHONES
from aviary.storage import atomic_open, file_sha256, write_text_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPEAKER_SPLITS = ("train-spk", "valid-spk", "test-spk")
ALL_SPLITS = SPLITS + SPEAKER_SPLITS
MANIFEST_NAME = "manifest.jsonl"
#: Phones may end this far past the audio's duration (rounding of aligner output, the
#: ~1 ms by which espeak's last event can overshoot) before it counts as an error.
ALIGNMENT_TOLERANCE = 0.02

_PHONE_SET = frozenset(PHONES)


class ManifestError(ValueError):
    """A manifest cannot be read or is invalid; the message names the file and line."""


Phone = tuple[str, float, float]


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance of a corpus.

    Attributes:
        id: unique id within the corpus.
        audio: path of the audio file (absolute after :func:`read_manifest`).
        duration: seconds.
        sample_rate: the file's rate in Hz (``load_audio`` resamples as asked).
        speaker: speaker id (string).
        text: transcript, if known.
        phones: alignment, list of (symbol, start, end) seconds, symbols in aviary's phone set.
        keyword: class label of keyword-spotting corpora (``aviary synth --words``).
    """

    id: str
    audio: str
    duration: float
    sample_rate: int
    speaker: str
    text: str | None = None
    phones: list[Phone] | None = None
    keyword: str | None = None

    def __post_init__(self) -> None:
        problem = validate_utterance(self)
        if problem:
            raise ManifestError(f"utterance {self.id!r}: {problem}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (phones as lists)."""
        # Built by hand: dataclasses.asdict deep-copies every phone tuple (slow for big corpora).
        phones = None if self.phones is None else [[s, round(a, 6), round(b, 6)] for s, a, b in self.phones]
        return {"id": self.id, "audio": self.audio, "duration": self.duration,
                "sample_rate": self.sample_rate, "speaker": self.speaker, "text": self.text,
                "phones": phones, "keyword": self.keyword}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Utterance":
        """Build from a dict (unknown keys, missing keys and wrong types raise ManifestError)."""
        if not isinstance(d, dict):
            raise ManifestError(f"expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ManifestError(f"unknown key(s) {unknown}; known keys: {sorted(names)}")
        missing = [k for k in ("id", "audio", "duration", "sample_rate", "speaker") if k not in d]
        if missing:
            raise ManifestError(f"missing key(s) {missing}")
        phones = d.get("phones")
        if phones is not None:
            if not isinstance(phones, list):
                raise ManifestError(f"'phones' must be a list, got {type(phones).__name__}")
            out = []
            for i, p in enumerate(phones):
                if (not isinstance(p, (list, tuple)) or len(p) != 3 or not isinstance(p[0], str)
                        or not all(_is_number(v) for v in p[1:])):
                    raise ManifestError(f"phones[{i}] = {p!r} is not [symbol, start, end]")
                out.append((p[0], float(p[1]), float(p[2])))
            phones = out
        for key, types in (("id", str), ("audio", str), ("speaker", str)):
            if not isinstance(d[key], types):
                raise ManifestError(f"'{key}' must be a string, got {d[key]!r}")
        if not _is_number(d["duration"]):
            raise ManifestError(f"'duration' must be a number, got {d['duration']!r}")
        sr = d["sample_rate"]
        if isinstance(sr, bool) or not (isinstance(sr, int) or (isinstance(sr, float) and sr.is_integer())):
            raise ManifestError(f"'sample_rate' must be an integer, got {sr!r}")
        for key in ("text", "keyword"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ManifestError(f"'{key}' must be a string or null, got {d[key]!r}")
        return cls(id=d["id"], audio=d["audio"], duration=float(d["duration"]), sample_rate=int(sr),
                   speaker=d["speaker"], text=d.get("text"), phones=phones, keyword=d.get("keyword"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_utterance(u: Utterance) -> str | None:
    """Return a description of what is wrong with ``u``, or None when it is valid."""
    if not u.id or not isinstance(u.id, str):
        return f"id must be a non-empty string, got {u.id!r}"
    if not u.audio:
        return "audio path is empty"
    if not (isinstance(u.duration, (int, float)) and math.isfinite(u.duration) and u.duration > 0):
        return f"duration must be a positive number, got {u.duration!r}"
    if not (isinstance(u.sample_rate, int) and u.sample_rate > 0):
        return f"sample_rate must be a positive integer, got {u.sample_rate!r}"
    if not isinstance(u.speaker, str) or not u.speaker:
        return f"speaker must be a non-empty string, got {u.speaker!r}"
    if u.phones is not None:
        prev_end = 0.0
        for i, (sym, start, end) in enumerate(u.phones):
            if sym not in _PHONE_SET:
                return (f"phones[{i}] symbol {sym!r} is not in aviary's phone set "
                        f"(map it with aviary.data.phones first)")
            if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
                return f"phones[{i}] = ({sym!r}, {start}, {end}) has a bad time range"
            if start < prev_end - 1e-6:
                return f"phones[{i}] = ({sym!r}, {start}, {end}) overlaps the previous phone ending at {prev_end}"
            prev_end = end
        if prev_end > u.duration + ALIGNMENT_TOLERANCE:
            return (f"alignment ends at {prev_end:.3f} s, after the audio's end "
                    f"({u.duration:.3f} s): alignment and audio do not match")
    return None


def read_manifest(path: str | os.PathLike, check_files: bool = False) -> list[Utterance]:
    """Read a JSON-lines manifest; relative audio paths become absolute.

    Args:
        path: the ``.jsonl`` file.
        check_files: also check that every audio file exists.

    Returns:
        The utterances in file order.

    Raises:
        ManifestError: unreadable file, malformed line (named as ``file:line``), duplicate id,
            or (with ``check_files``) a missing audio file.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: manifest file not found")
    base = p.resolve().parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            try:
                u = Utterance.from_dict(d)
            except ManifestError as e:
                raise ManifestError(f"{p}:{lineno}: {e}") from None
            if u.id in seen:
                raise ManifestError(f"{p}:{lineno}: duplicate id {u.id!r} (first on line {seen[u.id]})")
            seen[u.id] = lineno
            audio = Path(u.audio)
            if not audio.is_absolute():
                audio = base / audio
                u = dataclasses.replace(u, audio=str(audio))
            if check_files and not audio.is_file():
                raise ManifestError(f"{p}:{lineno}: audio file of {u.id!r} not found: {audio}")
            utts.append(u)
    return utts


def write_manifest(path: str | os.PathLike, utts: Iterable[Utterance], relative: bool = True) -> Path:
    """Write utterances as JSON lines, atomically (:func:`aviary.storage.atomic_open`).

    Args:
        path: output ``.jsonl`` file.
        utts: utterances.
        relative: store audio paths relative to the manifest's directory when they lie below it.

    Returns:
        The path written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.resolve().parent
    with atomic_open(p) as f:
        for u in utts:
            d = u.to_dict()
            if relative:
                a = Path(u.audio)
                if a.is_absolute():
                    try:
                        d["audio"] = str(a.resolve().relative_to(base))
                    except ValueError:
                        pass
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    return p


def manifest_path(path_or_dir: str | os.PathLike, split: str | None = None) -> Path:
    """The manifest file that ``load_manifest(path_or_dir, split)`` reads."""
    p = Path(path_or_dir)
    if split is not None and split not in ALL_SPLITS:
        raise ManifestError(f"split {split!r} is not one of {list(ALL_SPLITS)}")
    if p.is_dir():
        f = p / (MANIFEST_NAME if split is None else f"{split}.jsonl")
        if not f.is_file():
            raise ManifestError(f"{p}: corpus directory has no {f.name}")
        return f
    if not p.exists():
        raise ManifestError(f"{p}: no such manifest file or corpus directory")
    if split is None:
        return p
    # A corpus directory's manifest.jsonl stands for the directory, so its splits are found.
    if p.name == MANIFEST_NAME and (p.parent / f"{split}.jsonl").is_file():
        return p.parent / f"{split}.jsonl"
    raise ManifestError(f"{p}: a single manifest file has no split {split!r}; pass the corpus "
                        f"directory (with {split}.jsonl) instead")


def load_manifest(path_or_dir: str | os.PathLike, split: str | None = None,
                  check_files: bool = False) -> list[Utterance]:
    """Load a corpus directory or a manifest file.

    Args:
        path_or_dir: corpus directory or ``.jsonl`` file.
        split: ``None`` (all utterances), ``train|valid|test`` (utterance-level split) or
            ``train-spk|valid-spk|test-spk`` (speaker-disjoint split).
        check_files: check that every audio file exists.

    Returns:
        The utterances.
    """
    return read_manifest(manifest_path(path_or_dir, split), check_files=check_files)


def _split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` items by ``ratios``; when n >= len(ratios) every part gets at least one."""
    total = float(sum(ratios))
    counts = [int(math.floor(n * r / total)) for r in ratios]
    # Hand out the remainder to the largest fractional parts (train first on ties).
    rema = sorted(range(len(ratios)), key=lambda i: -(n * ratios[i] / total - counts[i]))
    for i in rema[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(ratios):
        for i in range(len(counts)):
            if counts[i] == 0:
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


def make_splits(utts: Sequence[Utterance], ratios: Sequence[float] = (8, 1, 1),
                seed: int = 0) -> dict[str, list[Utterance]]:
    """Utterance-level and speaker-disjoint train/valid/test splits.

    * ``train|valid|test``: per speaker, that speaker's utterances are shuffled and divided by
      ``ratios`` (so every speaker with >= 3 utterances appears in all three: the split for
      speaker identification).
    * ``train-spk|valid-spk|test-spk``: speakers are shuffled and divided by ``ratios`` (at
      least one speaker each when there are >= 3): the split for tasks that must generalise
      to unseen speakers (phones, keywords).

    Args:
        utts: the corpus.
        ratios: relative sizes of train, valid, test.
        seed: shuffling seed; the same seed and input give the same splits.

    Returns:
        Mapping from each name in :data:`ALL_SPLITS` to its utterances (corpus order kept).
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {ratios!r}")
    rng = random.Random(seed)
    by_spk: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(utts):
        by_spk[u.speaker].append(i)
    assign: dict[int, str] = {}
    for spk in sorted(by_spk):
        idx = by_spk[spk][:]
        rng.shuffle(idx)
        counts = _split_counts(len(idx), ratios)
        pos = 0
        for name, c in zip(SPLITS, counts):
            for i in idx[pos:pos + c]:
                assign[i] = name
            pos += c
    speakers = sorted(by_spk)
    rng.shuffle(speakers)
    spk_counts = _split_counts(len(speakers), ratios)
    spk_assign: dict[str, str] = {}
    pos = 0
    for name, c in zip(SPEAKER_SPLITS, spk_counts):
        for s in speakers[pos:pos + c]:
            spk_assign[s] = name
        pos += c
    out: dict[str, list[Utterance]] = {name: [] for name in ALL_SPLITS}
    for i, u in enumerate(utts):
        out[assign[i]].append(u)
        out[spk_assign[u.speaker]].append(u)
    return out


def write_corpus(out_dir: str | os.PathLike, utts: Sequence[Utterance], readme: str,
                 seed: int = 0, ratios: Sequence[float] = (8, 1, 1)) -> dict[str, int]:
    """Write a corpus directory: manifest.jsonl, the six split files and README.

    Args:
        out_dir: corpus directory (audio paths below it are stored relative).
        utts: all utterances.
        readme: text saying how the corpus was made (split sizes are appended).
        seed: split seed.
        ratios: split ratios.

    Returns:
        Number of utterances per file stem (``manifest``, ``train``, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [u.id for u in utts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ManifestError(f"{out}: duplicate utterance ids {dup}")
    write_manifest(out / MANIFEST_NAME, utts)
    splits = make_splits(utts, ratios=ratios, seed=seed)
    counts = {"manifest": len(utts)}
    for name, part in splits.items():
        write_manifest(out / f"{name}.jsonl", part)
        counts[name] = len(part)
    lines = [readme.rstrip(), "", f"Splits (seed {seed}, ratios {':'.join(str(r) for r in ratios)}):"]
    for name in ALL_SPLITS:
        nspk = len({u.speaker for u in splits[name]})
        hours = sum(u.duration for u in splits[name]) / 3600
        lines.append(f"  {name + '.jsonl':16s} {counts[name]:7d} utterances {nspk:5d} speakers {hours:8.3f} h")
    lines += ["", "Utterance-level splits (train/valid/test) hold every speaker in each part;",
              "the -spk splits are speaker-disjoint. Load with aviary.data.load_manifest(DIR, split)."]
    write_text_atomic(out / "README", "\n".join(lines) + "\n")
    return counts


def split_overlaps(splits: dict[str, Sequence[Utterance]], where: Any = "corpus") -> list[str]:
    """Problems of a set of splits that must be disjoint: the same utterance id in two
    splits, and (for the speaker-disjoint ``-spk`` splits) the same speaker in two.

    A speaker in both train-spk and test-spk silently inflates every speaker-disjoint
    result (the probe has heard the voice); an id in train and test tests on training data.

    Args:
        splits: split name -> utterances (only names present are compared).
        where: how messages name the corpus.

    Returns:
        One readable message per overlapping pair (empty when all is well).
    """
    problems = []
    for family in (SPLITS, SPEAKER_SPLITS):
        names = [n for n in family if n in splits]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ids = sorted({u.id for u in splits[a]} & {u.id for u in splits[b]})
                if ids:
                    problems.append(f"{where}: {len(ids)} utterance id(s) in both {a} and {b} "
                                    f"(e.g. {ids[:3]})")
                if family is SPEAKER_SPLITS:
                    spk = sorted({u.speaker for u in splits[a]} & {u.speaker for u in splits[b]})
                    if spk:
                        problems.append(f"{where}: {len(spk)} speaker(s) in both {a} and {b}, which must "
                                        f"be speaker-disjoint (e.g. {spk[:3]})")
    return problems


def _corpus_root(p: Path) -> Path | None:
    # A corpus directory, or the directory of its manifest.jsonl; None for a lone manifest file.
    return p if p.is_dir() else p.parent if p.name == MANIFEST_NAME else None


def split_file_paths(path_or_dir: str | os.PathLike) -> dict[str, Path]:
    """``{split: path}`` of the split files present in a corpus directory (or in the directory
    of its ``manifest.jsonl``); ``{}`` for a single manifest file outside a corpus directory."""
    root = _corpus_root(Path(path_or_dir))
    if root is None:
        return {}
    return {s: root / f"{s}.jsonl" for s in ALL_SPLITS if (root / f"{s}.jsonl").is_file()}


def load_split_files(path_or_dir: str | os.PathLike) -> dict[str, list[Utterance]]:
    """Every split file of a corpus directory (or of the directory of its ``manifest.jsonl``);
    ``{}`` for a single manifest file that is not part of a corpus directory."""
    return {s: read_manifest(f) for s, f in split_file_paths(path_or_dir).items()}


def manifest_fingerprint(path_or_dir: str | os.PathLike) -> str | None:
    """SHA-256 over a corpus's manifest files (``manifest.jsonl`` and the split files of a corpus
    directory; a lone manifest file itself), None when there is none to read. (Which utterances
    k-means targets were fitted on is ``train.targets.corpus_fingerprint``, over ids and durations.)

    Audio paths in a corpus directory's manifest are relative to it, so a corpus moved with its
    run (a renamed demo directory) keeps its fingerprint; the audio bytes are not hashed.
    """
    p = Path(path_or_dir)
    root = _corpus_root(p)
    files = [root / MANIFEST_NAME if root is not None else p, *split_file_paths(p).values()]
    present = [f for f in files if f.is_file()]
    if not present:
        return None
    h = hashlib.sha256()
    for f in present:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def check_disjoint_splits(path_or_dir: str | os.PathLike,
                          splits: dict[str, Sequence[Utterance]] | None = None) -> None:
    """Refuse a corpus whose splits overlap (see :func:`split_overlaps`).

    Args:
        path_or_dir: the corpus (its split files are read unless ``splits`` is given).
        splits: already loaded splits.

    Raises:
        ManifestError: naming the corpus, the splits and the first shared ids / speakers.
    """
    splits = load_split_files(path_or_dir) if splits is None else splits
    problems = split_overlaps(splits, path_or_dir)
    if problems:
        raise ManifestError("; ".join(problems) + ". Re-make the splits (e.g. `aviary prepare`), "
                            "or remove the shared utterances / speakers")
