"""Masked L1: hand-computed value, only masked frames count, empty mask is safe."""
import torch

from aviary.objectives.reconstruction import masked_l1

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly (60x slower matmuls
# measured); one thread keeps these tiny tests fast.
torch.set_num_threads(1)


def test_hand_computed_toy_batch():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]],
                         [[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])
    target = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [5.0, 5.0]],
                           [[2.0, 4.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # Masked elements: |1-0| |2-0| |3-3| |4-2| |1-2| |1-4| = 1 2 0 2 1 3 -> 9 / 6.
    out = masked_l1(pred, target, mask, lengths=torch.tensor([3, 2]))
    assert abs(out.loss.item() - 1.5) < 1e-6
    assert out.metrics["masked_frames"].item() == 3
    assert abs(out.metrics["masked_frac"].item() - 3 / 5) < 1e-6
    assert out.extras == {}
    assert set(masked_l1(pred, target, mask, return_extras=True).extras) == {"pred", "target", "mask"}
    # Utterance-mean predictor: row 0 mean over its 3 frames (8/3, 7/3), row 1 over 2 frames
    # (1.5, 2.5; its third frame is padding). Masked elements:
    # |8/3-0| |7/3-0| |8/3-3| |7/3-2| |1.5-2| |2.5-4| = 8/3 7/3 1/3 1/3 1/2 3/2 -> 23/3 / 6.
    assert abs(out.metrics["l1_utt_mean"].item() - 23 / 18) < 1e-6
    assert "l1_utt_mean" not in masked_l1(pred, target, mask).metrics


def test_unmasked_targets_do_not_matter_and_gradient_only_on_masked():
    torch.manual_seed(0)
    pred = torch.randn(2, 10, 3, requires_grad=True)
    target = torch.randn(2, 10, 3)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 7] = True
    a = masked_l1(pred, target, mask).loss
    t2 = target.clone()
    t2[~mask] = 1e6
    b = masked_l1(pred, t2, mask).loss
    assert torch.equal(a, b)
    a.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask] != 0).any()


def test_empty_mask_gives_zero_loss_with_graph():
    pred = torch.randn(1, 4, 2, requires_grad=True)
    out = masked_l1(pred, torch.zeros(1, 4, 2), torch.zeros(1, 4, dtype=torch.bool))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(pred.grad).all()
