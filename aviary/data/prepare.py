"""Corpus preparers: a folder of audio in some layout -> an aviary corpus directory.

Each preparer reads headers only (durations come from :func:`aviary.audio.audio_info`, no
decoding), attaches transcripts and alignments where it finds them, and writes the corpus
directory of :func:`aviary.data.manifest.write_corpus` (manifest.jsonl, 8:1:1 utterance-level
and speaker-disjoint splits, README). Audio stays where it is: manifests hold absolute paths.

Bad inputs: an audio file whose header cannot be read, a transcript line without audio, or an
alignment that does not fit its audio raise an error naming the file (and line), unless
``skip_bad=True``, in which case they are skipped, counted in the log and listed in the README
(and then every kept file is also decoded: truncated, NaN and too-short files are skipped too).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from aviary.audio import AudioError, audio_info
from aviary.data.alignment import AlignmentError, check_alignment, read_cpc_alignments, read_textgrid
from aviary.data.manifest import ManifestError, Utterance, write_corpus
from aviary.data.check import ERRORS, check_file

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg")


def _index_textgrids(align_dir: str | os.PathLike | None) -> dict[str, Path]:
    if align_dir is None:
        return {}
    d = Path(align_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: alignment directory not found")
    out: dict[str, Path] = {}
    for p in sorted(d.rglob("*")):
        if p.suffix.lower() == ".textgrid":
            out[p.stem] = p
    log.info("%s: %d TextGrid files", d, len(out))
    return out


class _Collector:
    """Utterances plus the bad inputs skipped on the way (when asked to skip)."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.utts: list[Utterance] = []
        self.skipped: list[str] = []

    def bad(self, message: str, exc: type[Exception] = ValueError) -> None:
        if not self.skip_bad:
            raise exc(message)
        self.skipped.append(message)
        log.warning("skipping (%d so far): %s", len(self.skipped), message)


def _phones_for(uid: str, duration: float, textgrids: dict[str, Path], cpc: dict | None,
                coll: _Collector) -> tuple[bool, list | None]:
    """Alignment of ``uid`` (TextGrid first, then CPC labels); (ok, phones)."""
    try:
        if uid in textgrids:
            phones = read_textgrid(textgrids[uid])
            check_alignment(phones, duration, source=str(textgrids[uid]))
            return True, phones
        if cpc is not None and uid in cpc:
            phones = cpc[uid]
            # CPC labels cover whole 10 ms frames: the last one may pass the end by < 10 ms.
            phones = [(s, a, min(b, duration)) for s, a, b in phones if a < duration]
            check_alignment(phones, duration, source=f"CPC alignment of {uid}")
            return True, phones
    except AlignmentError as e:
        coll.bad(str(e), AlignmentError)
        return False, None
    return True, None


def _readme(kind: str, root: Path, coll: _Collector, extra: Sequence[str]) -> str:
    lines = [f"Corpus prepared by `aviary prepare {kind}` from {root.resolve()}.",
             f"Command: {' '.join(sys.argv)}" if sys.argv and sys.argv[0] else "",
             f"{len(coll.utts)} utterances, {len({u.speaker for u in coll.utts})} speakers, "
             f"{sum(u.duration for u in coll.utts) / 3600:.3f} hours; audio paths are absolute.",
             *extra]
    if coll.skipped:
        lines.append(f"Skipped {len(coll.skipped)} bad input(s):")
        lines += [f"  {m}" for m in coll.skipped[:200]]
    return "\n".join(x for x in lines if x)


def _readable_info(path: Path, coll: _Collector):
    """The file's header info, or None after reporting an unusable file to ``coll``.

    With ``skip_bad`` every file is also decoded (:func:`aviary.data.check.check_file`): a
    header can be fine while the samples are truncated, NaN or too short, and a corpus
    prepared "skipping bad files" must not hand those to training, extraction and probes.
    """
    try:
        info = audio_info(path)
        if info.frames == 0:
            raise AudioError(f"{path}: no audio samples")
    except AudioError as e:
        coll.bad(str(e), AudioError)
        return None
    if coll.skip_bad:
        found, _duration = check_file(path)
        errors = [f"{kind} ({detail.replace(f'{path}: ', '')})" for kind, detail in found if kind in ERRORS]
        if errors:
            coll.bad(f"{path}: {'; '.join(errors)}", AudioError)
            return None
    return info


def prepare_librispeech(root: str | os.PathLike, out: str | os.PathLike,
                        alignments: str | os.PathLike | None = None,
                        cpc_alignments: str | os.PathLike | None = None,
                        seed: int = 0, skip_bad: bool = False) -> list[Utterance]:
    """Prepare a LibriSpeech-layout tree.

    Layout: ``<root>/[<subset>/]<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with
    ``<speaker>-<chapter>.trans.txt`` beside the audio (``UTT_ID TRANSCRIPT`` per line). The
    speaker id is the first field of the utterance id.

    Args:
        root: a LibriSpeech subset (``train-clean-100``) or a directory holding several.
        out: corpus directory to write.
        alignments: directory of MFA TextGrids named ``<utt_id>.TextGrid`` (any depth).
        cpc_alignments: s3prl/CPC ``converted_aligned_phones.txt`` (used where no TextGrid).
        seed: split seed.
        skip_bad: skip bad audio / alignments (counted, listed in the README) instead of raising.

    Returns:
        The utterances written.

    Raises:
        AudioError, ManifestError, AlignmentError: naming the file (and line) at fault.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: LibriSpeech root directory not found")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no *.trans.txt files: not a LibriSpeech-layout tree")
    textgrids = _index_textgrids(alignments)
    cpc = read_cpc_alignments(cpc_alignments) if cpc_alignments is not None else None
    coll = _Collector(skip_bad)
    n_aligned = 0
    from tqdm import tqdm

    for tf in tqdm(trans_files, desc="prepare librispeech", unit="chapter", disable=len(trans_files) < 20):
        for lineno, line in enumerate(tf.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = next((tf.parent / f"{uid}{ext}" for ext in AUDIO_EXTENSIONS
                          if (tf.parent / f"{uid}{ext}").is_file()), None)
            if audio is None:
                coll.bad(f"{tf}:{lineno}: no audio file for utterance {uid!r} in {tf.parent}", ManifestError)
                continue
            info = _readable_info(audio, coll)
            if info is None:
                continue
            ok, phones = _phones_for(uid, info.duration, textgrids, cpc, coll)
            if not ok:
                continue
            n_aligned += phones is not None
            coll.utts.append(Utterance(id=uid, audio=str(audio.resolve()), duration=info.duration,
                                       sample_rate=info.sample_rate, speaker=uid.split("-")[0],
                                       text=text.strip() or None, phones=phones))
    if not coll.utts:
        raise ManifestError(f"{root}: no usable utterances found")
    extra = [f"Alignments: {n_aligned} of {len(coll.utts)} utterances "
             f"(TextGrids: {alignments or 'none'}; CPC labels: {cpc_alignments or 'none'})."]
    write_corpus(out, coll.utts, _readme("librispeech", root, coll, extra), seed=seed)
    log.info("wrote %d utterances (%d aligned, %d skipped) to %s", len(coll.utts), n_aligned,
             len(coll.skipped), out)
    return coll.utts


def _speaker_of(rel: Path, level: int, root: Path) -> str:
    dirs = rel.parts[:-1]
    if level == 0:
        return root.resolve().name
    try:
        return dirs[level - 1] if level > 0 else dirs[level]
    except IndexError:
        raise ManifestError(f"{root / rel}: no directory at speaker level {level} "
                            f"(path has {len(dirs)} directories)") from None


def prepare_folder(folder: str | os.PathLike, out: str | os.PathLike, speaker_level: int = 1,
                   alignments: str | os.PathLike | None = None, seed: int = 0,
                   skip_bad: bool = False) -> list[Utterance]:
    """Prepare any folder of audio files (wav / flac / ogg, any depth).

    Args:
        folder: the folder.
        out: corpus directory to write.
        speaker_level: which directory of a file's path (relative to ``folder``) names its
            speaker: 1 = the first directory below ``folder``, 2 = the second, -1 = the file's
            own directory, 0 = one speaker for everything (named after ``folder``).
        alignments: directory of TextGrids named ``<file stem>.TextGrid``; a TextGrid or a
            ``.lab``/``.txt`` transcript beside the audio is also picked up (MFA corpus layout).
        seed: split seed.
        skip_bad: skip unreadable audio / bad alignments (counted) instead of raising.

    Returns:
        The utterances written. Ids are the relative path without suffix, ``/`` -> ``-``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise ManifestError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    textgrids = _index_textgrids(alignments)
    coll = _Collector(skip_bad)
    n_aligned = 0
    from tqdm import tqdm

    for p in tqdm(files, desc="prepare folder", unit="file", disable=len(files) < 500):
        rel = p.relative_to(root)
        uid = "-".join(rel.with_suffix("").parts)
        speaker = _speaker_of(rel, speaker_level, root)
        info = _readable_info(p, coll)
        if info is None:
            continue
        text = None
        for ext in (".lab", ".txt"):
            if p.with_suffix(ext).is_file():
                text = p.with_suffix(ext).read_text(encoding="utf-8").strip() or None
                break
        local_tg = {k: v for k, v in ((p.stem, p.with_suffix(".TextGrid")),) if v.is_file()}
        ok, phones = _phones_for(p.stem, info.duration, {**textgrids, **local_tg}, None, coll)
        if not ok:
            continue
        n_aligned += phones is not None
        coll.utts.append(Utterance(id=uid, audio=str(p.resolve()), duration=info.duration,
                                   sample_rate=info.sample_rate, speaker=speaker, text=text,
                                   phones=phones))
    if not coll.utts:
        raise ManifestError(f"{root}: no usable audio files")
    extra = [f"Speaker = path level {speaker_level}; alignments for {n_aligned} utterances."]
    write_corpus(out, coll.utts, _readme("folder", root, coll, extra), seed=seed)
    log.info("wrote %d utterances (%d skipped) to %s", len(coll.utts), len(coll.skipped), out)
    return coll.utts
