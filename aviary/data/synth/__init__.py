"""Synthetic speech corpora with exact phone alignments (espeak-ng through ctypes)."""
from aviary.data.synth.corpus import SynthConfig, make_speakers, synthesize_corpus

__all__ = ["SynthConfig", "make_speakers", "synthesize_corpus"]
