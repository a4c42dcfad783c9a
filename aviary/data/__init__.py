"""Corpora and labels: manifests, phone inventory, alignments, datasets, samplers, synthetic speech.

Light imports only here (no torch): ``aviary.data.dataset`` holds the torch parts.
"""
from aviary.data.alignment import AlignmentError, frame_labels, read_cpc_alignments, read_textgrid
from aviary.data.manifest import (ManifestError, Utterance, load_manifest, make_splits, read_manifest,
                                  write_corpus, write_manifest)
from aviary.data.phones import IGNORE_INDEX, NUM_PHONES, PHONES, PhoneError, phone_id
from aviary.data.sampler import DurationBatchSampler


def __getattr__(name: str):
    # AudioDataset / collate_audio import torch; load them only when asked for.
    if name in ("AudioDataset", "collate_audio"):
        from aviary.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'aviary.data' has no attribute {name!r}")


__all__ = [
    "AlignmentError", "frame_labels", "read_cpc_alignments", "read_textgrid",
    "ManifestError", "Utterance", "load_manifest", "make_splits", "read_manifest", "write_corpus",
    "write_manifest", "IGNORE_INDEX", "NUM_PHONES", "PHONES", "PhoneError", "phone_id",
    "DurationBatchSampler", "AudioDataset", "collate_audio",
]
