"""Masked spectrogram patch modelling: masks, InfoNCE, MSE, the joint objective."""
from __future__ import annotations

import math

import pytest
import torch

from aviary.objectives.mspm import (MSPMConfig, cluster_mask, gather_masked, infonce, masked_mse,
                                    num_masked_for, random_mask)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_infonce_hand_computed():
    # One clip, two masked patches, K = 2. logits[i, j] = pred_i . target_j.
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    # logits = [[1, 2], [2, 0]]; positives on the diagonal: 1 and 0.
    l0 = -(1 - math.log(math.exp(1) + math.exp(2)))
    l1 = -(0 - math.log(math.exp(2) + math.exp(0)))
    loss, acc = infonce(pred, target, torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # Row 0's best target is 1 (wrong), row 1's best is 0 (wrong).
    assert acc.item() == 0.0
    # Swapping the targets makes both predictions right.
    _, acc2 = infonce(pred, target.flip(1), torch.ones(1, 2, dtype=torch.bool))
    assert acc2.item() == 1.0


def test_infonce_softmax_runs_over_targets_not_predictions():
    # The paper's Eq. 1 normalises over targets j for each prediction i; the transposed
    # normalisation (reference code) gives a different value on an asymmetric example.
    pred = torch.tensor([[[1.0, 0.0, 0.0], [3.0, 1.0, 0.0], [0.5, 2.0, 1.0]]])
    target = torch.eye(3)[None]
    logits = pred[0] @ target[0].T
    eq1 = -torch.log_softmax(logits, dim=1).diagonal().mean()
    transposed = -torch.log_softmax(logits, dim=0).diagonal().mean()
    loss, _ = infonce(pred, target, torch.ones(1, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(eq1.item(), rel=1e-6)
    assert abs(eq1.item() - transposed.item()) > 1e-3


def test_infonce_variable_lengths_equal_per_clip():
    g = _gen(1)
    pred, target = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    loss, acc = infonce(pred, target, valid)
    # Reference: clip by clip, then the mean over all 8 predictions.
    total, correct = 0.0, 0
    for b, n in ((0, 5), (1, 3)):
        logits = pred[b, :n] @ target[b, :n].T
        total += -torch.log_softmax(logits, -1).diagonal().sum().item()
        correct += int((logits.argmax(-1) == torch.arange(n)).sum())
    assert loss.item() == pytest.approx(total / 8, rel=1e-5)
    assert acc.item() == pytest.approx(correct / 8)
    # Padding rows and columns do not influence the result.
    pred2, target2 = pred.clone(), target.clone()
    pred2[1, 3:] = 100.0
    target2[1, 3:] = -100.0
    assert infonce(pred2, target2, valid)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_masked_mse_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 3.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 3.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    # Per patch means: (1 + 4) / 2 = 2.5, (1 + 1) / 2 = 1, (4 + 0) / 2 = 2; mean = 5.5 / 3.
    assert masked_mse(pred, target, valid).item() == pytest.approx(5.5 / 3)


def test_num_masked_scales_with_length():
    n = num_masked_for(torch.tensor([512, 128, 1, 3, 0]), 400, 512)
    assert n.tolist() == [400, 100, 1, 2, 0]


def _grid_valid(steps: list[int], T: int, Fq: int) -> torch.Tensor:
    t = torch.arange(T)[None, :, None]
    return (t < torch.tensor(steps)[:, None, None]).expand(-1, -1, Fq).clone()


@pytest.mark.parametrize("seed", range(5))
def test_cluster_mask_exact_count_and_no_padding(seed):
    valid = _grid_valid([64, 40, 7], 64, 8)
    n = num_masked_for(valid.sum((1, 2)), 400, 512)
    mask = cluster_mask(valid, n, generator=_gen(seed))
    assert mask.sum((1, 2)).tolist() == n.tolist()
    assert not bool((mask & ~valid).any())


def test_random_mask_exact_count_and_no_padding():
    valid = _grid_valid([30, 10, 1], 30, 1).flatten(1)
    n = num_masked_for(valid.sum(-1), 400, 512)
    mask = random_mask(valid, n, generator=_gen(3))
    assert mask.sum(-1).tolist() == n.tolist()
    assert not bool((mask & ~valid).any())


def test_masks_are_seeded():
    valid = _grid_valid([64, 50], 64, 8)
    n = torch.tensor([400, 300])
    a = cluster_mask(valid, n, generator=_gen(7))
    b = cluster_mask(valid, n, generator=_gen(7))
    c = cluster_mask(valid, n, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    r1 = random_mask(valid.flatten(1), n, generator=_gen(7))
    assert torch.equal(r1, random_mask(valid.flatten(1), n, generator=_gen(7)))


@pytest.mark.parametrize("C", [3, 4, 5])
def test_cluster_shape_is_a_block(C):
    # Asking for exactly C*C patches on a large grid: unless the first block was clipped by
    # the grid's edge, the mask is one C x C square.
    valid = torch.ones(1, 40, 40, dtype=torch.bool)
    squares = 0
    for seed in range(20):
        mask = cluster_mask(valid, torch.tensor([C * C]), cluster_sizes=(C,), generator=_gen(seed))[0]
        assert int(mask.sum()) == C * C
        ts, fs = mask.nonzero(as_tuple=True)
        h, w = int(ts.max() - ts.min()) + 1, int(fs.max() - fs.min()) + 1
        if (h, w) == (C, C):
            squares += 1
            assert bool(mask[ts.min():ts.max() + 1, fs.min():fs.max() + 1].all())
    assert squares >= 15  # edge-clipped blocks are rare on a 40 x 40 grid


def test_cluster_mask_blocks_are_clustered():
    # Cluster masking leaves far fewer isolated masked patches than random masking.
    valid = torch.ones(4, 64, 8, dtype=torch.bool)
    n = torch.full((4,), 200)

    def isolated(mask):
        m = mask.float()[:, None]
        neigh = torch.nn.functional.conv2d(m, torch.ones(1, 1, 3, 3), padding=1) - m
        return int(((neigh == 0) & (m > 0)).sum())

    cl = cluster_mask(valid, n, generator=_gen(0))
    rd = random_mask(valid.flatten(1), n, generator=_gen(0)).view(4, 64, 8)
    assert isolated(cl) < isolated(rd)


def test_gather_masked():
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = gather_masked(mask)
    assert idx[0].tolist() == [1, 3, 4]
    assert idx[1, 0].item() == 0 and valid.tolist() == [[True, True, True], [True, False, False]]


def test_config_validation():
    with pytest.raises(ValueError, match="num_masked"):
        MSPMConfig(num_masked=600, num_masked_of=512)
    with pytest.raises(ValueError, match="masking"):
        MSPMConfig(masking="blocks")
    assert MSPMConfig.from_dict(MSPMConfig().to_dict()) == MSPMConfig()
