"""Property-based tests (hypothesis) of every masking function: arbitrary lengths, batch
sizes and seeds give masks of the right shape that never touch padding and hit their
documented counts (issue 9)."""
import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from aviary.objectives import mspm
from aviary.objectives.masking import MaskingConfig, bernoulli_span_mask, mam_mask, span_mask

lengths_st = st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=5)


def _valid(lengths, T):
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 20), span=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_mam_span_mask(lengths, extra, span, seed):
    T = max(lengths) + extra
    m = span_mask(torch.tensor(lengths), T, 0.15, span, torch.Generator().manual_seed(seed))
    assert m.shape == (len(lengths), T) and m.dtype == torch.bool
    assert not (m & ~_valid(lengths, T)).any()
    for b, n in enumerate(lengths):
        assert int(m[b].sum()) <= max(1, round(n * 0.15 / span)) * span


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=4), D=st.integers(1, 12),
       seed=st.integers(0, 2**31), tera=st.booleans())
def test_mam_mask_corrupts_only_valid_frames(lengths, D, seed, tera):
    T = max(lengths)
    cfg = MaskingConfig(span=3, freq_mask_ratio=0.2 if tera else 0.0, noise_prob=0.15 if tera else 0.0)
    feats = torch.randn(len(lengths), T, D)
    out = mam_mask(feats, torch.tensor(lengths), cfg, torch.Generator().manual_seed(seed))
    valid = _valid(lengths, T)
    assert out.inputs.shape == feats.shape
    assert not (out.time_mask & ~valid).any()
    # padding frames are never altered
    assert torch.equal(out.inputs[~valid], feats[~valid])


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31))
def test_ssast_random_and_cluster_masks_are_exact(lengths, frac, seed):
    Tg, Fg = max(lengths), 3
    valid_t = _valid(lengths, Tg)
    n = (torch.tensor(lengths) * Fg * frac).long()
    g = torch.Generator().manual_seed(seed)
    grid = valid_t[:, :, None].expand(-1, -1, Fg)
    cm = mspm.cluster_mask(grid, n, generator=g)
    assert torch.equal(cm.sum((1, 2)), n) and not (cm & ~grid).any()
    flat = grid.reshape(len(lengths), -1)
    rm = mspm.random_mask(flat, n, generator=g)
    assert torch.equal(rm.sum(1), n) and not (rm & ~flat).any()


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, extra=st.integers(0, 20), seed=st.integers(0, 2**31))
def test_token_span_mask(lengths, extra, seed):
    T = max(lengths) + extra
    m = bernoulli_span_mask(torch.tensor(lengths), T, generator=torch.Generator().manual_seed(seed))
    assert m.shape == (len(lengths), T)
    assert not (m & ~_valid(lengths, T)).any()
    for b, n in enumerate(lengths):
        if n > 0:
            assert int(m[b].sum()) >= 1
