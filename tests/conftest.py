"""Suite-wide settings.

`make test` runs two pytest-xdist workers on a 2-core machine: each worker uses ONE torch
thread. Two threads per worker oversubscribe the cores, and PyTorch's spinning OpenMP threads
then burn several times the CPU for the same work (measured: 7.7x for a training step).
Subprocesses started by tests inherit the environment variables.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def tiny_aalbert(tmp_path):
    """``make(durations) -> (checkpoint, manifest)``: a seeded random ``aalbert-tiny`` pretraining
    checkpoint and a manifest of noise files of those durations (seconds), under ``tmp_path``."""
    import numpy as np
    import soundfile as sf

    from aviary.data import Utterance, write_manifest
    from aviary.models.registry import get_family, get_preset
    from aviary.storage import save_tensors

    def make(durations=(1.0, 1.3)):
        torch.manual_seed(0)
        cfg = get_preset("aalbert-tiny")
        model = get_family(cfg.family).build_pretrain(cfg)
        save_tensors(tmp_path / "model.safetensors", model.state_dict(), config={"model": cfg.to_dict(), "step": 0})
        rng = np.random.default_rng(0)
        utts = []
        for i, secs in enumerate(durations):
            path = tmp_path / f"u{i}.wav"
            sf.write(path, (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32), 16000)
            utts.append(Utterance(id=f"u{i}", audio=str(path), duration=secs, sample_rate=16000, speaker="s"))
        write_manifest(tmp_path / "m.jsonl", utts)
        return tmp_path / "model.safetensors", tmp_path / "m.jsonl"

    return make
