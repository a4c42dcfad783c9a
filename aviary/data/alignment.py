"""Phone alignments: readers for MFA TextGrids and CPC/s3prl frame labels, and frame labels at
any encoder frame rate.

An alignment is a list of ``(symbol, start, end)`` in seconds with symbols in aviary's phone set
(:mod:`aviary.data.phones`), sorted, non-overlapping. Frame labels are derived from those times
and the *output* frame shift of the model (front-end shift x encoder downsampling, e.g.
0.01 x 3 = 0.03 s for Mockingjay LARGE): never from a hard-coded hop of 160 samples, the
mismatch that once drove s3prl's phone accuracy to 8 % (REFERENCE.md section 2).

Coverage rules (documented here, checked by :func:`check_alignment` and the tests):

* output frame ``t`` covers ``[t * shift, (t + 1) * shift)``; its label is the phone that
  overlaps it for the longest total time (ties: the earlier phone);
* frames that no interval touches get :data:`IGNORE_INDEX` (-100), which cross-entropy
  ignores: gaps in an alignment and audio past its last phone are simply unlabelled;
* an alignment that ends more than ``tolerance`` seconds past the audio's end is an error
  (:class:`AlignmentError`): it belongs to other audio. One that covers less than
  ``min_coverage`` of the audio gets a warning from :func:`check_alignment`.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from aviary.data.phones import (IGNORE_INDEX, NUM_PHONES, PhoneError, arpabet_to_phone,
                                cpc_label_to_phone, phone_id)

log = logging.getLogger(__name__)

Phone = tuple[str, float, float]


class AlignmentError(ValueError):
    """An alignment file cannot be parsed or does not fit its audio; names the file."""


def merge_repeats(phones: Iterable[Phone]) -> list[Phone]:
    """Merge touching intervals with the same symbol (e.g. ``sil`` from ``sil`` + ``sp``)."""
    out: list[Phone] = []
    for sym, start, end in phones:
        if out and out[-1][0] == sym and abs(out[-1][2] - start) < 1e-9:
            out[-1] = (sym, out[-1][1], end)
        else:
            out.append((sym, start, end))
    return out


_TG_TOKEN = re.compile(r'"(?:[^"]|"")*"|\[\d*\]|<exists>|<absent>|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    # Praat writes UTF-16 (with a BOM) when a label is not ASCII.
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def read_textgrid_tiers(path: str | os.PathLike) -> dict[str, list[tuple[float, float, str]]]:
    """Parse a Praat TextGrid (long or short text format) into its interval tiers.

    Both formats reduce to the same sequence of values once keys (``xmin =``) and indices
    (``[3]``) are dropped, so one token walk reads either.

    Args:
        path: ``.TextGrid`` file.

    Returns:
        ``{tier name: [(xmin, xmax, text), ...]}`` for every IntervalTier (point tiers skipped).

    Raises:
        AlignmentError: not a TextGrid or malformed (names the file).
    """
    p = Path(path)
    try:
        text = _read_text(p)
    except (OSError, UnicodeDecodeError) as e:
        raise AlignmentError(f"{p}: cannot read TextGrid ({e})") from None
    toks = [t for t in _TG_TOKEN.findall(text) if not t.startswith("[")]
    pos = 0

    def take(kind: str) -> str | float:
        nonlocal pos
        if pos >= len(toks):
            raise AlignmentError(f"{p}: TextGrid ends early (expected {kind})")
        t = toks[pos]
        pos += 1
        if kind == "str":
            if not t.startswith('"'):
                raise AlignmentError(f"{p}: malformed TextGrid: expected a string, got {t!r}")
            return t[1:-1].replace('""', '"')
        if kind == "num":
            try:
                return float(t)
            except ValueError:
                raise AlignmentError(f"{p}: malformed TextGrid: expected a number, got {t!r}") from None
        return t

    if take("str") != "ooTextFile" or take("str") != "TextGrid":
        raise AlignmentError(f"{p}: not a Praat TextGrid (header must say ooTextFile / TextGrid)")
    take("num"), take("num")
    if take("any") != "<exists>":
        return {}
    n_tiers = int(take("num"))
    tiers: dict[str, list[tuple[float, float, str]]] = {}
    for _ in range(n_tiers):
        cls, name = take("str"), take("str")
        take("num"), take("num")
        n = int(take("num"))
        if cls == "IntervalTier":
            ivs = []
            for _ in range(n):
                a, b, lab = take("num"), take("num"), take("str")
                ivs.append((float(a), float(b), str(lab)))
            tiers[str(name)] = ivs
        elif cls == "TextTier":
            for _ in range(n):
                take("num"), take("str")
        else:
            raise AlignmentError(f"{p}: unknown tier class {cls!r}")
    return tiers


def read_textgrid(path: str | os.PathLike, tier: str = "phones",
                  mapper: Callable[[str], str] = arpabet_to_phone) -> list[Phone]:
    """Read the phone tier of an MFA TextGrid, mapped to aviary's phone set.

    Args:
        path: ``.TextGrid`` file written by the Montreal Forced Aligner (or Praat).
        tier: tier name; MFA 2 names tiers ``"<speaker> - phones"`` when it aligns several
            speakers, so a tier whose name ends with ``tier`` (case-insensitive) also matches.
        mapper: source symbol -> inventory symbol; empty labels are silence (MFA leaves
            pauses unlabelled).

    Returns:
        ``[(symbol, start, end), ...]`` with repeats merged.

    Raises:
        AlignmentError: no such tier, malformed file, or an unknown phone (file and symbol named).
    """
    tiers = read_textgrid_tiers(path)
    name = tier if tier in tiers else next(
        (t for t in tiers if t.lower().strip().endswith(tier.lower())), None)
    if name is None:
        raise AlignmentError(f"{path}: no tier named {tier!r} (tiers: {sorted(tiers)})")
    out = []
    for a, b, lab in tiers[name]:
        try:
            sym = mapper(lab)
        except PhoneError as e:
            raise AlignmentError(f"{path}: tier {name!r} interval [{a}, {b}]: {e}") from None
        out.append((sym, a, b))
    return merge_repeats(out)


def labels_to_intervals(labels: Sequence[str], frame_shift: float) -> list[Phone]:
    """Run-length encode per-frame symbols into intervals (frame ``t`` = [t*shift, (t+1)*shift))."""
    out: list[Phone] = []
    for t, sym in enumerate(labels):
        if out and out[-1][0] == sym:
            out[-1] = (sym, out[-1][1], (t + 1) * frame_shift)
        else:
            out.append((sym, t * frame_shift, (t + 1) * frame_shift))
    return out


def read_cpc_alignments(path: str | os.PathLike, frame_shift: float = 0.01,
                        mapper: Callable[[int], str] = cpc_label_to_phone) -> dict[str, list[Phone]]:
    """Read s3prl/CPC ``converted_aligned_phones.txt``: ``utt_id l0 l1 l2 ...`` per line.

    Args:
        path: the text file; one utterance per line, one integer label per 10 ms frame.
        frame_shift: seconds per label (10 ms in the CPC release).
        mapper: integer label -> inventory symbol (the 41-class Kaldi order by default).

    Returns:
        ``{utt_id: [(symbol, start, end), ...]}``.

    Raises:
        AlignmentError: a malformed line or unknown label, named by file and line number.
    """
    p = Path(path)
    out: dict[str, list[Phone]] = {}
    try:
        f = open(p, encoding="utf-8")
    except OSError as e:
        raise AlignmentError(f"{p}: cannot read alignments ({e})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise AlignmentError(f"{p}:{lineno}: utterance {fields[0]!r} has no labels")
            try:
                syms = [mapper(int(x)) for x in fields[1:]]
            except ValueError as e:  # PhoneError is a ValueError; so is int("x")
                raise AlignmentError(f"{p}:{lineno}: bad label for {fields[0]!r}: {e}") from None
            if fields[0] in out:
                raise AlignmentError(f"{p}:{lineno}: duplicate utterance id {fields[0]!r}")
            out[fields[0]] = labels_to_intervals(syms, frame_shift)
    return out


def frame_labels(phones: Sequence[Phone], num_frames: int, frame_shift: float) -> np.ndarray:
    """Majority phone id per output frame.

    Args:
        phones: ``[(symbol, start, end), ...]`` in seconds, symbols in aviary's phone set.
        num_frames: number of output frames of the model for this utterance.
        frame_shift: seconds per output frame = front-end shift x encoder downsampling.

    Returns:
        int64 (num_frames,): for each frame ``[t*shift, (t+1)*shift)`` the id of the symbol
        with the largest total overlap (ties: lowest start), or -100 where no interval overlaps.

    Raises:
        ValueError: ``num_frames < 0`` or ``frame_shift <= 0``, or an interval with
            ``end < start`` / non-finite times. PhoneError: unknown symbol.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if not (math.isfinite(frame_shift) and frame_shift > 0):
        raise ValueError(f"frame_shift must be a positive number of seconds, got {frame_shift}")
    # Overlap per (frame, class); a few phones touch each frame, so loop phones, slice frames.
    overlap = np.zeros((num_frames, NUM_PHONES), dtype=np.float64)  # (T, C)
    first_start = np.full((num_frames, NUM_PHONES), np.inf)          # tie-break: earlier phone
    for sym, start, end in phones:
        k = phone_id(sym)
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise ValueError(f"phone ({sym!r}, {start}, {end}) has a bad time range")
        if end <= start:
            continue
        t0 = max(int(math.floor(start / frame_shift)), 0)
        t1 = min(int(math.ceil(end / frame_shift)), num_frames)
        if t1 <= t0:
            continue
        t = np.arange(t0, t1)
        ov = np.minimum(end, (t + 1) * frame_shift) - np.maximum(start, t * frame_shift)  # (n,)
        ov = np.clip(ov, 0.0, None)
        overlap[t, k] += ov
        first_start[t, k] = np.minimum(first_start[t, k], start)
    if num_frames == 0:
        return np.zeros(0, dtype=np.int64)
    best = overlap.max(axis=1, keepdims=True)  # (T, 1)
    # Among the classes within float noise of the best overlap pick the earliest-starting.
    cand = np.where(overlap >= best - 1e-12, first_start, np.inf)
    labels = np.argmin(cand, axis=1).astype(np.int64)
    # Overlaps under a nanosecond are float noise from interval ends, not coverage.
    labels[best[:, 0] <= 1e-9] = IGNORE_INDEX
    return labels


def check_alignment(phones: Sequence[Phone], duration: float, tolerance: float = 0.02,
                    min_coverage: float = 0.9, source: str = "") -> float:
    """Check that an alignment fits its audio.

    Args:
        phones: the alignment.
        duration: audio duration in seconds.
        tolerance: how far past the audio's end the last phone may end.
        min_coverage: warn (logging) when less of the audio than this is covered.
        source: file / utterance named in messages.

    Returns:
        Fraction of the audio covered by intervals.

    Raises:
        AlignmentError: intervals overlap, run backwards, or end after the audio + tolerance.
    """
    covered, prev_end = 0.0, 0.0
    for i, (sym, start, end) in enumerate(phones):
        if end < start or start < prev_end - 1e-6:
            raise AlignmentError(f"{source}: phone {i} ({sym!r}, {start}, {end}) overlaps or runs backwards")
        covered += min(end, duration) - min(start, duration)
        prev_end = end
    if prev_end > duration + tolerance:
        raise AlignmentError(f"{source}: alignment ends at {prev_end:.3f} s but the audio is "
                             f"{duration:.3f} s long: alignment and audio do not match")
    frac = covered / duration if duration > 0 else 0.0
    if frac < min_coverage:
        log.warning("%s: alignment covers only %.0f%% of %.2f s of audio; the rest is unlabelled "
                    "(-100)", source, 100 * frac, duration)
    return frac
