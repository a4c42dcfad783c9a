"""Downstream tasks: which splits they use and how labels are made.

* ``phone``: frame-level phoneme classification (REFERENCE.md section 2). Labels come from
  the manifest's alignments, brought to the upstream's own frame rate with
  :func:`aviary.data.frame_labels` and the upstream's ``frame_shift`` (never a hard-coded
  10 ms: the R-fold downsampling mismatch once drove s3prl's accuracy to 8 %). Frames no
  alignment covers get -100 and are ignored. Utterance-level 8:1:1 split.
* ``speaker``: utterance-level speaker identification, mean pooling over valid frames.
  Utterance-level split: every speaker's utterances are spread over train, valid and test.
* ``keyword``: utterance-level keyword classification (``aviary synth --words``), labels from
  the manifest's ``keyword``; speaker-disjoint split, as Speech Commands is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aviary.data import frame_labels
from aviary.data.manifest import check_disjoint_splits, load_manifest, make_splits
from aviary.data.phones import PHONES

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskSpec:
    """Static facts of a task.

    Attributes:
        name: ``phone``, ``speaker`` or ``keyword``.
        level: ``frame`` or ``utterance``.
        splits: (train, valid, test) split names of :func:`aviary.data.load_manifest`.
    """

    name: str
    level: str
    splits: tuple[str, str, str]


TASKS: dict[str, TaskSpec] = {
    "phone": TaskSpec("phone", "frame", ("train", "valid", "test")),
    "speaker": TaskSpec("speaker", "utterance", ("train", "valid", "test")),
    "keyword": TaskSpec("keyword", "utterance", ("train-spk", "valid-spk", "test-spk")),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def load_splits(data: str | os.PathLike, task: str) -> dict[str, list[Any]]:
    """The task's train / valid / test utterances of a corpus.

    Args:
        data: a corpus directory (its split files are used) or a single manifest file (split
            here with :func:`aviary.data.manifest.make_splits`, seed 0, 8:1:1).
        task: task name.

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}``.
    """
    spec = get_task(task)
    p = Path(data)
    if p.is_dir() or (p.name == "manifest.jsonl" and (p.parent / f"{spec.splits[0]}.jsonl").is_file()):
        parts = [load_manifest(data, split=s) for s in spec.splits]
    else:
        log.info("%s: a single manifest, splitting it 8:1:1 with seed 0", data)
        splits = make_splits(load_manifest(data), seed=0)
        parts = [splits[s] for s in spec.splits]
    # Overlapping splits (a speaker in train-spk and test-spk) silently inflate every result.
    check_disjoint_splits(data, dict(zip(spec.splits, parts)))
    out = dict(zip(("train", "valid", "test"), parts))
    for name, utts in out.items():
        if not utts:
            raise ValueError(f"{data}: split {name!r} of task {task!r} is empty")
    check_labels(out, task, data)
    return out


def check_labels(splits: dict[str, Sequence[Any]], task: str, where: Any = "corpus") -> None:
    """Every utterance must carry the task's annotation (alignment, keyword)."""
    attr = {"phone": "phones", "keyword": "keyword", "speaker": "speaker"}[get_task(task).name]
    for name, utts in splits.items():
        missing = [u.id for u in utts if getattr(u, attr, None) is None]
        if missing:
            raise ValueError(f"{where}: task {task!r} needs '{attr}' on every utterance; {len(missing)} "
                             f"utterances of split {name!r} have none (e.g. {missing[:3]})")


def label_fraction_subset(utts: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """A seeded subset of ``fraction`` of the training utterances (at least one).

    The subset for a smaller fraction is contained in the subset for a larger one with the
    same seed (one permutation, cut at different points), so the accuracy-vs-labels curve
    compares nested training sets.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    if fraction >= 1.0:
        return list(utts)
    order = np.random.default_rng(seed).permutation(len(utts))
    n = max(1, int(round(fraction * len(utts))))
    keep = sorted(order[:n].tolist())
    return [utts[i] for i in keep]


def class_names(task: str, splits: dict[str, Sequence[Any]]) -> list[str]:
    """Classes of a task: the phone inventory, or the sorted speakers / keywords seen."""
    spec = get_task(task)
    if spec.name == "phone":
        return list(PHONES)
    attr = "speaker" if spec.name == "speaker" else "keyword"
    return sorted({str(getattr(u, attr)) for utts in splits.values() for u in utts})


def utterance_label(task: str, utt: Any, classes: dict[str, int]) -> int:
    """Class id of an utterance-level task."""
    attr = "speaker" if task == "speaker" else "keyword"
    return classes[str(getattr(utt, attr))]


def phone_frame_labels(utt: Any, num_frames: int, frame_shift: float) -> np.ndarray:
    """Frame labels ``(num_frames,)`` int64 at the upstream's frame rate (-100 = unaligned)."""
    return np.asarray(frame_labels(utt.phones, num_frames, frame_shift), dtype=np.int64)
