"""aviary: self-supervised speech and audio representation learning.

Mockingjay, Audio ALBERT, TERA, SSAST and vq-wav2vec + BERT, end to end: synthetic and real
corpora, pretraining, layer-wise extraction, probing and analysis.

    >>> import aviary
    >>> model = aviary.load("runs/aalbert")            # run dir, bundle file, or "s3prl:CKPT"
    >>> hidden_states, lengths = model.extract(wavs, wav_lengths)   # L+1 states, (B, T, H) each
"""
from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(path: str, **kwargs):
    """Load a pretrained upstream from a run directory, a bundle file or ``s3prl:CKPT``.

    See :func:`aviary.hub.load` for details.
    """
    # Deferred: `import aviary` (and `aviary --help`) stays free of torch until a model is loaded.
    from aviary.hub import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
