"""Negative sampling and the future-prediction BCE loss (vq-wav2vec)."""
import math

import pytest
import torch

from aviary.objectives.contrastive import future_prediction_loss, sample_negatives
from aviary.objectives.quantize import codebook_metrics, gumbel_temperature, kmeans_loss


def test_negatives_never_positive_nor_padding():
    lengths = torch.tensor([2, 7, 50, 33])
    g = torch.Generator().manual_seed(0)
    neg = sample_negatives(lengths, 50, 10, generator=g)
    assert neg.shape == (4, 50, 10) and neg.dtype == torch.long
    t = torch.arange(50).view(1, 50, 1)
    valid = (t < lengths.view(4, 1, 1)).expand_as(neg)
    assert (neg[valid] != t.expand_as(neg)[valid]).all()
    assert (neg >= 0).all() and (neg < lengths.view(4, 1, 1)).all()
    # length-2 utterance: the only negative of frame 0 is frame 1 and vice versa
    assert (neg[0, 0] == 1).all() and (neg[0, 1] == 0).all()


def test_negatives_seeded_and_cover_all_other_frames():
    lengths = torch.tensor([6])
    a = sample_negatives(lengths, 6, 2000, generator=torch.Generator().manual_seed(3))
    b = sample_negatives(lengths, 6, 2000, generator=torch.Generator().manual_seed(3))
    c = sample_negatives(lengths, 6, 2000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(a[0, 2], minlength=6).float()
    assert counts[2] == 0
    others = counts[[0, 1, 3, 4, 5]] / 2000
    assert torch.allclose(others, torch.full((5,), 0.2), atol=0.04)  # uniform over the 5 others


def test_negatives_reject_too_short():
    with pytest.raises(ValueError, match="2 frames"):
        sample_negatives(torch.tensor([1, 5]), 5, 3)


def _bce_pos(x):
    return -math.log(1 / (1 + math.exp(-x)))


def _bce_neg(x):
    return -math.log(1 - 1 / (1 + math.exp(-x)))


def test_toy_loss_by_hand():
    # B=1, T=3, K=1, D=1, N=1. Step 0 with offset 1: c_0 predicts z_1, c_1 predicts z_2.
    preds = torch.tensor([[[[1.0]], [[2.0]], [[-1.0]]]])  # (1, 3, 1, 1)
    z = torch.tensor([[[0.5], [-1.0], [2.0]]])  # (1, 3, 1)
    neg = torch.tensor([[[2], [0], [1]]])  # negative of frame 1 is frame 0, of frame 2 is frame 1
    res = future_prediction_loss(preds, z, torch.tensor([3]), neg, offset=1)
    loss, m = res.loss, res.metrics
    # t=0: positive 1*(-1) = -1, negative 1*z_0 = 0.5; t=1: positive 2*2 = 4, negative 2*z_1 = -2
    expect = (_bce_pos(-1.0) + _bce_neg(0.5) + _bce_pos(4.0) + _bce_neg(-2.0)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["num_positives"].item() == 2
    assert m["accuracy"].item() == pytest.approx(0.5)  # t=0 loses (-1 < 0.5), t=1 wins


def test_loss_ignores_padding_and_counts_positives():
    torch.manual_seed(0)
    preds = torch.randn(1, 5, 2, 3)
    z = torch.randn(1, 5, 3)
    neg = sample_negatives(torch.tensor([4]), 5, 3, generator=torch.Generator().manual_seed(1))
    res = future_prediction_loss(preds, z, torch.tensor([4]), neg)
    loss, m = res.loss, res.metrics
    # steps 1 and 2 ahead within 4 frames: 3 + 2 positives
    assert m["num_positives"].item() == 5
    z2 = z.clone()
    z2[0, 4] = 100.0  # padding frame: must not matter
    preds2 = preds.clone()
    preds2[0, 4] = -7.0
    loss2 = future_prediction_loss(preds2, z2, torch.tensor([4]), neg).loss
    assert loss.item() == pytest.approx(loss2.item())


def test_shapes_checked():
    with pytest.raises(ValueError, match="targets must be"):
        future_prediction_loss(torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 5), torch.tensor([4]),
                               torch.zeros(1, 4, 2, dtype=torch.long))


def test_gumbel_temperature_schedule():
    assert gumbel_temperature(0.0) == pytest.approx(2.0)
    assert gumbel_temperature(0.35) == pytest.approx(1.25)
    assert gumbel_temperature(0.7) == pytest.approx(0.5)
    assert gumbel_temperature(1.0) == pytest.approx(0.5)
    assert gumbel_temperature(-1.0) == pytest.approx(2.0) and gumbel_temperature(5.0) == pytest.approx(0.5)
    xs = [gumbel_temperature(i / 100) for i in range(101)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))


def test_kmeans_loss_by_hand():
    z = torch.tensor([[[[1.0, 2.0]]], [[[9.0, 9.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    e = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    valid = torch.tensor([[True], [False]])
    loss = kmeans_loss(z, e, valid, gamma=0.25)
    assert loss.item() == pytest.approx((1 + 4) / 2 * 1.25)
    loss.backward()
    # codebook term moves e towards sg(z); commitment term moves z towards sg(e) with weight 0.25
    assert torch.allclose(e.grad[0, 0, 0], torch.tensor([-1.0, -2.0]))
    assert torch.allclose(z.grad[0, 0, 0], torch.tensor([0.25, 0.5]))
    assert (z.grad[1] == 0).all()


def test_codebook_metrics():
    valid = torch.ones(1, 8, dtype=torch.bool)
    same = torch.zeros(1, 8, 2, dtype=torch.long)
    m = codebook_metrics(same, valid, num_vars=4)
    assert m["perplexity"].item() == pytest.approx(1.0) and m["code_usage"].item() == pytest.approx(2 / 8)
    spread = torch.arange(8).view(1, 8, 1).repeat(1, 1, 2) % 4
    m = codebook_metrics(spread, valid, num_vars=4)
    assert m["perplexity_g0"].item() == pytest.approx(4.0) and m["code_usage"].item() == pytest.approx(1.0)
