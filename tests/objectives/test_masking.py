"""MAM masking: proportion, span placement, padding, per-utterance 80/10/10, seeds, TERA."""
import pytest
import torch

from aviary.config import ConfigError
from aviary.objectives.masking import MaskingConfig, mam_mask, span_mask

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly (60x slower matmuls
# measured); one thread keeps these tiny tests fast.
torch.set_num_threads(1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_span_count_and_placement_never_touch_padding():
    lengths = torch.tensor([1000, 700, 300, 5])
    m = span_mask(lengths, 1000, 0.15, 7, _gen())
    valid = torch.arange(1000)[None] < lengths[:, None]
    assert not (m & ~valid).any()
    assert m[3].sum() == 0  # shorter than one span: nothing selected
    # round(n * 0.15 / C) spans of C frames; they may overlap, so the total is at most that.
    for b, n in enumerate(lengths.tolist()[:3]):
        n_spans = round(n * 0.15 / 7)
        assert 7 <= m[b].sum() <= n_spans * 7


def test_masked_fraction_close_to_15_percent():
    lengths = torch.randint(200, 1500, (256,))
    m = span_mask(lengths, 1500, 0.15, 7, _gen(1))
    frac = m.sum() / lengths.sum()
    # Overlapping spans make it a little lower than 15 %.
    assert 0.12 < frac.item() <= 0.16


def test_seeded_masks_repeat_and_differ_across_seeds():
    x = torch.randn(3, 200, 8)
    lengths = torch.tensor([200, 150, 90])
    cfg = MaskingConfig(freq_mask_ratio=0.2, noise_prob=0.5)
    a, b, c = (mam_mask(x, lengths, cfg, _gen(s)) for s in (7, 7, 8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.time_mask, b.time_mask)
    assert not torch.equal(a.time_mask, c.time_mask)


def test_actions_zero_random_keep_one_draw_per_utterance():
    torch.manual_seed(0)
    B, T, D = 400, 60, 4
    x = torch.randn(B, T, D) + 10.0  # no frame is zero by chance
    lengths = torch.full((B,), T)
    tm = torch.zeros(B, T, dtype=torch.bool)
    tm[:, 10:17] = True
    out = mam_mask(x, lengths, MaskingConfig(), _gen(3), time_mask=tm)
    sel = out.inputs[:, 10:17]  # (B, 7, D)
    zero = (sel == 0).all(-1).all(-1)
    kept = (sel == x[:, 10:17]).all(-1).all(-1)
    assert torch.equal(zero, out.action == 0)
    # "keep" utterances are unchanged ("random" ones may also draw their own frames by chance).
    assert kept[out.action == 2].all() and not kept[out.action == 0].any()
    # Random replacement: every replaced frame is some frame of the same utterance.
    for b in (out.action == 1).nonzero().flatten()[:10].tolist():
        for t in range(10, 17):
            assert (out.inputs[b, t] == x[b]).all(-1).any()
    # Unselected frames never change.
    assert torch.equal(out.inputs[:, :10], x[:, :10]) and torch.equal(out.inputs[:, 17:], x[:, 17:])
    frac = torch.bincount(out.action, minlength=3).float() / B
    assert abs(frac[0] - 0.8) < 0.06 and abs(frac[1] - 0.1) < 0.05 and abs(frac[2] - 0.1) < 0.05


def test_tera_frequency_band_and_noise():
    x = torch.randn(64, 50, 80) + 10.0
    lengths = torch.full((64,), 50)
    lengths[0] = 20
    cfg = MaskingConfig(zero_prob=0.0, random_prob=0.0, freq_mask_ratio=0.2, noise_prob=0.15)
    out = mam_mask(x, lengths, cfg, _gen(2))
    width = out.freq_mask.sum(1)
    assert width.max() <= 16 and width.max() > 0
    # The band is zeroed over every valid frame (noise, added last as in s3prl, lands on
    # top); bins outside it only see the noise, if any; padding frames are untouched.
    for b in range(64):
        band = out.freq_mask[b]
        n = int(lengths[b])
        assert bool(out.noised[b]) or (out.inputs[b][:n, band] == 0).all()
        assert torch.equal(out.inputs[b][n:], x[b][n:])
        same = torch.equal(out.inputs[b][:, ~band], x[b][:, ~band])
        assert same != bool(out.noised[b])
    # Noise never lands on padding.
    if out.noised[0]:
        assert torch.equal(out.inputs[0, 20:][:, ~out.freq_mask[0]], x[0, 20:][:, ~out.freq_mask[0]])


def test_tera_band_on_stacked_frames_is_one_band_of_bins_in_every_frame():
    # R = 3 stacked frames of 80 bins: the band is drawn over the 80 bins (width <= 16) and
    # the same bins are zeroed in each of the three frames.
    R, F = 3, 80
    x = torch.randn(32, 20, R * F) + 10.0
    lengths = torch.full((32,), 20)
    cfg = MaskingConfig(zero_prob=0.0, random_prob=0.0, freq_mask_ratio=0.2)
    out = mam_mask(x, lengths, cfg, _gen(4), stack=R)
    parts = out.freq_mask.reshape(32, R, F)
    assert torch.equal(parts[:, 0], parts[:, 1]) and torch.equal(parts[:, 0], parts[:, 2])
    width = parts[:, 0].sum(1)
    assert width.max() <= 16 and width.max() > 0
    for b in range(32):
        band = parts[b, 0].nonzero().flatten()
        if band.numel():
            assert int(band.max() - band.min()) + 1 == band.numel()  # contiguous
            assert (out.inputs[b][:, out.freq_mask[b]] == 0).all()
    with pytest.raises(ValueError, match="stack=7"):
        mam_mask(x, lengths, cfg, _gen(4), stack=7)


def test_given_mask_must_not_touch_padding_and_configs_validate():
    x = torch.randn(1, 10, 2)
    tm = torch.zeros(1, 10, dtype=torch.bool)
    tm[0, 8] = True
    with pytest.raises(ValueError, match="padding"):
        mam_mask(x, torch.tensor([5]), MaskingConfig(), time_mask=tm)
    with pytest.raises(ConfigError, match="random_prob"):
        MaskingConfig(zero_prob=0.95, random_prob=0.1)
    with pytest.raises(ConfigError, match="span"):
        MaskingConfig(span=0)
