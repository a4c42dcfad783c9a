"""Front-ends: log-mel (+deltas), log linear spectrogram, Kaldi-style fbank, CMVN.

See :mod:`aviary.features.frontend`.
"""
from aviary.features.frontend import (FRONTEND_KINDS, FrontEnd, FrontEndConfig, build_frontend,
                                     compute_global_stats)

__all__ = ["FRONTEND_KINDS", "FrontEnd", "FrontEndConfig", "build_frontend", "compute_global_stats"]
