"""``aviary check-data``: scan every file of a corpus up front and report what is wrong.

Every audio file listed in the manifest is opened and decoded in blocks (so a 2-hour file
costs little memory), and classified:

errors (the file cannot be used; training skips it with ``skip_bad``, otherwise stops):
    ``missing``, ``empty``, ``corrupt`` (header unreadable or decoding fails),
    ``truncated``, ``nonfinite`` (NaN / inf samples), ``too_short`` (< one 25 ms window),
    ``bad_alignment`` (phones ending after the audio), ``duration_mismatch`` (the manifest's
    duration differs from the file's by more than 0.1 s: crops are drawn from the manifest's
    duration, so a stale one makes most crops fall past the end of the file).
warnings (usable, but worth knowing; the loader handles them):
    ``resampled`` (rate differs from the target), ``low_bit_depth`` (8-bit),
    ``multichannel`` (downmixed), ``long`` (longer than ``long_seconds``: cropped in
    pretraining), ``silent`` (all samples zero).
corpus errors (of a corpus directory's split files): an utterance id in two splits, a
    speaker in two of the speaker-disjoint ``-spk`` splits.

The report groups files by problem; the exit code of the command is 1 when any error was
found (``--strict``: also for warnings), else 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf

from aviary.audio import MIN_DURATION, AudioError, audio_info, load_audio
from aviary.data.manifest import ALIGNMENT_TOLERANCE, load_manifest, load_split_files, split_overlaps
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

ERRORS = ("missing", "empty", "corrupt", "truncated", "nonfinite", "too_short", "bad_alignment",
          "duration_mismatch")
WARNINGS = ("resampled", "low_bit_depth", "multichannel", "long", "silent")
_BLOCK = 16000 * 30


@dataclasses.dataclass
class CheckReport:
    """Result of :func:`check_corpus`: problem name -> list of (utterance id, detail)."""

    source: str
    num_utterances: int = 0
    num_ok: int = 0
    hours: float = 0.0
    problems: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    corpus_errors: list[str] = dataclasses.field(default_factory=list)  # overlapping splits

    @property
    def failed(self) -> bool:
        """Whether any error (of a file or of the splits) was found."""
        return bool(self.num_errors or self.corpus_errors)

    @property
    def num_errors(self) -> int:
        return len({uid for k in ERRORS for uid, _ in self.problems.get(k, [])})

    @property
    def num_warnings(self) -> int:
        return sum(len(self.problems.get(k, [])) for k in WARNINGS)

    def bad_ids(self) -> set[str]:
        """Ids of utterances with at least one error."""
        return {uid for k in ERRORS for uid, _ in self.problems.get(k, [])}

    def to_dict(self) -> dict:
        return {"source": self.source, "num_utterances": self.num_utterances, "num_ok": self.num_ok,
                "hours": round(self.hours, 4), "num_errors": self.num_errors,
                "num_warnings": self.num_warnings, "corpus_errors": list(self.corpus_errors),
                "problems": {k: [list(x) for x in v] for k, v in self.problems.items() if v}}

    def format(self, max_listed: int = 10) -> str:
        """A readable, grouped report."""
        lines = [f"check-data {self.source}: {self.num_utterances} utterances, {self.hours:.3f} h; "
                 f"{self.num_ok} usable, {self.num_errors} unusable, {self.num_warnings} warnings"]
        if self.corpus_errors:
            lines.append("ERRORS (splits)")
            lines += [f"  {e}" for e in self.corpus_errors]
        for title, kinds in (("ERRORS (file unusable)", ERRORS), ("WARNINGS (handled by the loader)", WARNINGS)):
            present = [k for k in kinds if self.problems.get(k)]
            if not present:
                continue
            lines.append(title)
            for k in present:
                items = self.problems[k]
                lines.append(f"  {k}: {len(items)}")
                for uid, detail in items[:max_listed]:
                    lines.append(f"    {uid}: {detail}")
                if len(items) > max_listed:
                    lines.append(f"    ... and {len(items) - max_listed} more")
        return "\n".join(lines)


def _classify_audio_error(msg: str) -> str:
    for key, kind in (("not found", "missing"), ("empty", "empty"), ("no audio samples", "empty"),
                      ("truncated", "truncated"), ("NaN", "nonfinite")):
        if key in msg:
            return kind
    return "corrupt"


def check_file(path: str | os.PathLike, sample_rate: int = 16000, long_seconds: float = 60.0,
               min_seconds: float = MIN_DURATION) -> tuple[list[tuple[str, str]], float]:
    """Check one audio file. Returns ([(problem, detail), ...], duration in seconds)."""
    found: list[tuple[str, str]] = []
    try:
        info = audio_info(path)
    except AudioError as e:
        return [(_classify_audio_error(str(e)), str(e))], 0.0
    if info.frames == 0:
        return [("empty", f"{path}: 0 frames")], 0.0
    n, nonfinite, peak = 0, 0, 0.0
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                block = f.read(_BLOCK, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                n += block.shape[0]
                fin = np.isfinite(block)
                nonfinite += int(block.size - np.count_nonzero(fin))
                if fin.any():
                    peak = max(peak, float(np.max(np.abs(block[fin]))))
    except (sf.LibsndfileError, RuntimeError) as e:
        return [("corrupt", f"{path}: decoding failed after {n} frames ({e})")], n / info.sample_rate
    duration = n / info.sample_rate
    if n < info.frames - 16:
        found.append(("truncated", f"header says {info.frames} frames, decoded {n}"))
    if nonfinite:
        found.append(("nonfinite", f"{nonfinite} NaN/inf samples"))
    if duration < min_seconds:
        found.append(("too_short", f"{duration:.4f} s < {min_seconds} s"))
    if info.sample_rate != sample_rate:
        found.append(("resampled", f"{info.sample_rate} Hz -> {sample_rate} Hz"))
    if info.subtype in ("PCM_U8", "PCM_S8", "ULAW", "ALAW"):
        found.append(("low_bit_depth", f"{info.subtype} samples"))
    if info.channels != 1:
        found.append(("multichannel", f"{info.channels} channels, averaged to mono"))
    if duration > long_seconds:
        found.append(("long", f"{duration:.1f} s > {long_seconds:.0f} s, cropped in pretraining"))
    if peak == 0.0 and not nonfinite:
        found.append(("silent", "all samples are zero"))
    return found, duration


def check_corpus(path_or_dir: str | os.PathLike, split: str | None = None, sample_rate: int = 16000,
                 long_seconds: float = 60.0, progress: bool = True) -> CheckReport:
    """Scan every audio file of a corpus directory or manifest.

    Args:
        path_or_dir: corpus directory or manifest file (a malformed manifest raises
            ManifestError naming file and line before anything is scanned).
        split: check one split only.
        sample_rate: the rate models expect (others are reported as resampled).
        long_seconds: files longer than this are reported as long.
        progress: tqdm bar.

    Returns:
        A :class:`CheckReport`.
    """
    from tqdm import tqdm

    utts = load_manifest(path_or_dir, split)
    rep = CheckReport(source=str(path_or_dir), num_utterances=len(utts))
    rep.corpus_errors = split_overlaps(load_split_files(path_or_dir), path_or_dir)
    for u in tqdm(utts, desc="check-data", unit="file", disable=not progress):
        found, duration = check_file(u.audio, sample_rate, long_seconds)
        if duration and abs(duration - u.duration) > 0.1:
            found.append(("duration_mismatch", f"manifest {u.duration:.2f} s, file {duration:.2f} s"))
        if u.phones and duration and u.phones[-1][2] > duration + ALIGNMENT_TOLERANCE:
            found.append(("bad_alignment", f"phones end at {u.phones[-1][2]:.2f} s, audio {duration:.2f} s"))
        for kind, detail in found:
            rep.problems[kind].append((u.id, f"{u.audio}: {detail}" if not detail.startswith(str(u.audio)) else detail))
        if not any(k in ERRORS for k, _ in found):
            rep.num_ok += 1
            rep.hours += duration / 3600
    return rep


def write_report(rep: CheckReport, path: str | os.PathLike) -> None:
    """Write the report as JSON."""
    write_text_atomic(path, json.dumps(rep.to_dict(), indent=1) + "\n")


def usable_utterances(utts: Sequence[Any], sample_rate: int = 16000
                      ) -> tuple[list[Any], list[tuple[str, str]]]:
    """Split utterances into those whose audio loads and those that fail (``--skip-bad``).

    Each file is read with :func:`aviary.audio.load_audio`, exactly as extraction and
    probing read it, so a kept file is one they can use.

    Returns:
        (kept utterances, [(id, error message), ...] of the skipped ones).
    """
    kept, skipped = [], []
    for u in utts:
        try:
            load_audio(u.audio, sample_rate)
        except AudioError as e:
            skipped.append((str(u.id), str(e)))
            continue
        kept.append(u)
    if skipped:
        log.warning("skipping %d of %d unusable files (first: %s)", len(skipped), len(utts), skipped[0][1])
    return kept, skipped
