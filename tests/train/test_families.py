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


def test_ssast_measures_fbank_statistics_on_the_corpus(sine_corpus, tmp_path):
    """SSAST normalises fbank with corpus statistics: measured before step 0, stored in the
    checkpoint, used by the loaded upstream; 0 utterances keeps the config's (AudioSet) values."""
    import aviary
    from aviary.features import FrontEndConfig

    base = ["steps=1", "precision=fp32", "max_batch_seconds=4", "crop_seconds=1.2", "val_every=0",
            "tensorboard=false"]
    m, t = resolve_configs("ssast-frame-cpu", overrides=base)
    pretrain(m, t, sine_corpus, tmp_path / "fit")
    fe = aviary.load(str(tmp_path / "fit")).checkpoint_meta["model"]["frontend"]
    default = FrontEndConfig()
    assert fe["fbank_mean"] != pytest.approx(default.fbank_mean)
    m2, t2 = resolve_configs("ssast-frame-cpu", overrides=base + ["corpus_stats_utterances=0"])
    pretrain(m2, t2, sine_corpus, tmp_path / "keep")
    fe2 = aviary.load(str(tmp_path / "keep")).checkpoint_meta["model"]["frontend"]
    assert fe2["fbank_mean"] == pytest.approx(m2.frontend.fbank_mean)
    # resuming recomputes the same statistics, so the config check accepts the run
    m3, t3 = resolve_configs("ssast-frame-cpu", overrides=base[1:] + ["steps=2"])
    pretrain(m3, t3, sine_corpus, tmp_path / "fit", resume=True)
