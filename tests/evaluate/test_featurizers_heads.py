"""Featurizers (layer, last, weighted sum) and heads (linear, mlp1, mlp2)."""
import pytest
import torch

from aviary.evaluate.featurizers import LayerSelect, WeightedSum, build_featurizer, parse_layer_spec
from aviary.evaluate.heads import build_head


def test_parse_layer_spec():
    assert parse_layer_spec("3") == 3
    assert parse_layer_spec("last") == "last"
    assert parse_layer_spec(" Weighted ") == "weighted"
    assert parse_layer_spec(-1, 4) == 3
    with pytest.raises(ValueError, match="out of range"):
        parse_layer_spec(4, 4)
    with pytest.raises(ValueError, match="not an integer"):
        parse_layer_spec("middle")


def test_layer_select_picks_each_layer():
    states = torch.randn(2, 5, 4, 8)  # (B, T, N, H)
    for k in range(4):
        f = build_featurizer(k, 4)
        assert torch.equal(f(states), states[:, :, k])
    assert torch.equal(build_featurizer("last", 4)(states), states[:, :, 3])
    # A one-layer stack (frozen probe reading only layer 2 from the cache) selects index 0.
    f = build_featurizer(2, 4, stacked_indices=[2])
    assert isinstance(f, LayerSelect) and torch.equal(f(states[:, :, 2:3]), states[:, :, 2])
    with pytest.raises(ValueError, match="not among"):
        build_featurizer(1, 4, stacked_indices=[2])


def test_weighted_sum_starts_uniform_and_gets_gradient():
    states = torch.randn(3, 7, 4, 8)
    ws = build_featurizer("weighted", 4)
    assert isinstance(ws, WeightedSum)
    assert torch.all(ws.weights == 0)
    assert ws.normalized_weights() == pytest.approx([0.25] * 4)
    assert torch.allclose(ws(states), states.mean(dim=2), atol=1e-6)
    # The loss prefers layer 2: the gradient must reach the layer weights and favour it.
    loss = -(ws(states) * states[:, :, 2]).sum()
    loss.backward()
    assert ws.weights.grad is not None and ws.weights.grad.abs().sum() > 0
    assert int(torch.argmin(ws.weights.grad)) == 2


def test_weighted_sum_layer_norm_is_parameter_free():
    ws = WeightedSum(3, layer_norm=True)
    assert [n for n, _ in ws.named_parameters()] == ["weights"]
    states = torch.randn(2, 5, 3, 16) * torch.tensor([1.0, 100.0, 0.01])[None, None, :, None]
    out = ws(states)
    normed = torch.nn.functional.layer_norm(states, (16,))
    assert torch.allclose(out, normed.mean(dim=2), atol=1e-5)
    with pytest.raises(ValueError, match="built for 3 layers"):
        ws(torch.randn(2, 4, 8))


@pytest.mark.parametrize("kind,n_linear", [("linear", 1), ("mlp1", 2), ("mlp2", 3)])
def test_heads_shapes_and_depth(kind, n_linear):
    head = build_head(kind, 12, 5, hidden=7)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == n_linear
    assert head(torch.randn(4, 9, 12)).shape == (4, 9, 5)
    if kind != "linear":
        assert head[0].out_features == 7


def test_head_errors():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("mlp3", 4, 2)
    with pytest.raises(ValueError, match="num_classes"):
        build_head("linear", 4, 1)
