"""Shared fixtures of the training tests: a tiny on-disk sine corpus."""
from pathlib import Path

import numpy as np
import pytest


def write_sine_corpus(root: Path, n: int = 20, seed: int = 0) -> Path:
    """``n`` short noisy-sine wav files (0.3 .. 1.2 s, 4 speakers) with train/valid/test splits."""
    import soundfile as sf

    from aviary.data.manifest import Utterance, write_corpus

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(n):
        dur = float(rng.uniform(0.3, 1.2))
        t = np.arange(int(dur * 16000)) / 16000
        f0 = rng.uniform(100, 400)
        wav = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) \
            + rng.normal(0, 0.02, t.size)
        path = root / f"u{i:03d}.wav"
        sf.write(path, wav.astype(np.float32), 16000, subtype="PCM_16")
        utts.append(Utterance(id=f"u{i:03d}", audio=str(path), duration=t.size / 16000,
                              sample_rate=16000, speaker=f"s{i % 4}"))
    write_corpus(root, utts, readme="noisy sines for the training tests")
    return root


@pytest.fixture(scope="session")
def sine_corpus(tmp_path_factory) -> Path:
    return write_sine_corpus(tmp_path_factory.mktemp("sines") / "corpus")
