"""Every audio family pretrains through the one loop (2 steps, CPU-sized presets)."""
import math

import pytest

from aviary.train.loop import pretrain
from aviary.train.recipe import resolve_configs

PRESETS = ["mockingjay-tiny", "aalbert-tiny", "ssast-frame-cpu", "ssast-patch-cpu", "vq-wav2vec-gumbel-cpu",
           "vq-wav2vec-kmeans-cpu"]


@pytest.mark.parametrize("preset", PRESETS)
def test_family_pretrains_through_the_loop(preset, sine_corpus, tmp_path):
    m, t = resolve_configs(preset, overrides=[
        "steps=2", "precision=fp32", "max_batch_seconds=4", "crop_seconds=1.2", "val_every=2",
        "val_batches=1", "tensorboard=false", "log_every=1"])
    res = pretrain(m, t, sine_corpus, tmp_path / "run")
    assert res.step == 2 and res.nonfinite_steps == 0
    assert math.isfinite(res.train_loss) and res.valid_loss is not None and math.isfinite(res.valid_loss)
    import aviary

    up = aviary.load(str(tmp_path / "run"))  # the run directory is a loadable upstream
    assert up.num_hidden_states >= 2
