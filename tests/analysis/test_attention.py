"""Attention JSD: the divergence itself, the layer-pair averaging and padding handling."""
import math

import numpy as np
import pytest
import torch

from aviary.analysis.attention import (LayerJSDAccumulator, JSDResult, js_divergence, layer_jsd,
                                       plot_jsd_heatmaps)
from aviary.lengths import padding_mask
from aviary.models.layers import TransformerStack


def _random_probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).softmax(-1)


def test_identical_distributions_give_zero():
    p = _random_probs(5, 7)
    assert torch.allclose(js_divergence(p, p), torch.zeros(5, dtype=torch.float64), atol=1e-12)


def test_disjoint_distributions_give_one():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.3, 0.7])
    assert float(js_divergence(p, q)) == pytest.approx(1.0, abs=1e-12)


def test_symmetric_and_bounded():
    p, q = _random_probs(10, 6, seed=1), _random_probs(10, 6, seed=2)
    a, b = js_divergence(p, q), js_divergence(q, p)
    assert torch.allclose(a, b)
    assert bool((a >= 0).all()) and bool((a <= 1).all())


def test_hand_computed_value():
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4):
    # KL(P||M) = log2(4/3); KL(Q||M) = 1/2 log2(2/3) + 1/2 log2(2); JSD = mean of the two.
    p = torch.tensor([1.0, 0.0])
    q = torch.tensor([0.5, 0.5])
    expected = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert float(js_divergence(p, q)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.311278, abs=1e-6)


def test_layer_matrix_averages_heads_and_queries():
    # Two layers, two heads, one utterance of 2 positions. Head 0: identical maps (JSD 0);
    # head 1: query 0 disjoint (1), query 1 the hand-computed pair (0.311278).
    a0 = torch.tensor([[[[1.0, 0.0], [0.3, 0.7]], [[1.0, 0.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    a1 = torch.tensor([[[[1.0, 0.0], [0.3, 0.7]], [[0.0, 1.0], [0.5, 0.5]]]])
    res = layer_jsd([a0, a1], torch.tensor([2]))
    jsd_toy = float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])))
    assert res.per_head[0, 0, 1] == pytest.approx(0.0, abs=1e-12)
    assert res.per_head[1, 0, 1] == pytest.approx((1.0 + jsd_toy) / 2, abs=1e-9)
    assert res.matrix[0, 1] == pytest.approx((1.0 + jsd_toy) / 4, abs=1e-9)
    assert res.matrix[1, 0] == res.matrix[0, 1]
    assert np.all(np.diag(res.matrix) == 0)
    assert res.num_queries == 2 and res.num_utterances == 1


def test_padding_queries_are_excluded():
    # Row 0 has 3 valid positions; row 1 only 2. Garbage at padded queries of row 1 must not count.
    torch.manual_seed(0)
    T, h, L = 3, 2, 3
    maps = [_random_probs(2, h, T, T, seed=i) for i in range(L)]
    for a in maps:  # a key-padding mask gives padded keys zero probability
        a[1, :, :, 2] = 0
        a[1] /= a[1].sum(-1, keepdim=True)
    lengths = torch.tensor([3, 2])
    batched = layer_jsd(maps, lengths)
    acc = LayerJSDAccumulator()
    acc.update([a[:1] for a in maps], torch.tensor([3]))
    acc.update([a[1:, :, :2, :2] for a in maps], torch.tensor([2]))
    one_by_one = acc.result()
    np.testing.assert_allclose(batched.per_head, one_by_one.per_head, atol=1e-12)
    assert batched.num_queries == 5
    # Changing a padded query's row changes nothing.
    for a in maps:
        a[1, :, 2, :] = torch.tensor([0.0, 1.0, 0.0])
    np.testing.assert_allclose(layer_jsd(maps, lengths).per_head, batched.per_head, atol=1e-12)


def _stack_attentions(stack, x, lengths):
    kpm = padding_mask(lengths, x.shape[1])
    _, attn = stack(x, kpm, need_weights=True)
    return attn


def test_real_stack_padded_batch_equals_one_by_one():
    torch.manual_seed(0)
    stack = TransformerStack(3, share_layers=False, hidden_size=16, num_heads=2, ffn_size=32).eval()
    x = torch.randn(2, 9, 16)
    lengths = torch.tensor([9, 5])
    with torch.no_grad():
        batched = layer_jsd(_stack_attentions(stack, x, lengths), lengths)
        acc = LayerJSDAccumulator()
        for b in range(2):
            n = int(lengths[b])
            acc.update(_stack_attentions(stack, x[b:b + 1, :n], lengths[b:b + 1]), lengths[b:b + 1])
    np.testing.assert_allclose(batched.per_head, acc.result().per_head, atol=1e-5)
    assert batched.matrix.shape == (3, 3)
    assert bool((batched.matrix > 0).sum() == 6)  # distinct layers attend differently


def test_shared_layer_same_input_gives_zero_divergence():
    # AALBERT: one parameter set applied L times. Applied to the same input, every
    # application attends identically: the whole matrix, not only the diagonal, is 0.
    torch.manual_seed(0)
    stack = TransformerStack(4, share_layers=True, hidden_size=16, num_heads=2, ffn_size=32).eval()
    x = torch.randn(2, 7, 16)
    lengths = torch.tensor([7, 4])
    kpm = padding_mask(lengths, 7)
    with torch.no_grad():
        maps = [stack.layer(i)(x, kpm, need_weights=True)[1] for i in range(4)]
        same = layer_jsd(maps, lengths)
        chained = layer_jsd(_stack_attentions(stack, x, lengths), lengths)
    np.testing.assert_allclose(same.matrix, 0.0, atol=1e-9)
    assert np.all(np.diag(chained.matrix) == 0)
    assert chained.off_diagonal_mean() > 0  # inputs differ layer to layer, so maps do too


def test_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(B, h, T, T\)"):
        layer_jsd([torch.rand(2, 3, 4)], torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="layer 1"):
        layer_jsd([torch.rand(1, 2, 4, 4), torch.rand(1, 2, 5, 5)], torch.tensor([4]))


def test_round_trip_and_heatmap(tmp_path):
    res = layer_jsd([_random_probs(1, 2, 4, 4, seed=i) for i in range(3)], torch.tensor([4]))
    back = JSDResult.from_dict(res.to_dict())
    np.testing.assert_allclose(back.matrix, res.matrix, atol=1e-6)
    out = plot_jsd_heatmaps({"a": res, "b": back}, str(tmp_path / "jsd.png"))
    assert (tmp_path / "jsd.png").stat().st_size > 1000
    assert out.endswith("jsd.png")
