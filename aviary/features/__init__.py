"""Front-ends: log-mel (+deltas), log linear spectrogram, Kaldi-style fbank, CMVN.

See :mod:`aviary.features.frontend`.
"""
from aviary.features.frontend import FrontEnd, FrontEndConfig, build_frontend, compute_global_stats

__all__ = ["FrontEnd", "FrontEndConfig", "build_frontend", "compute_global_stats"]
