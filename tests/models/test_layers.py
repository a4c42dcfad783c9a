"""Shared transformer blocks: attention paths agree, padding is ignored, sharing, counts."""
import math

import pytest
import torch

from aviary.lengths import padding_mask
from aviary.models.layers import (FeedForward, MultiHeadSelfAttention, TransformerLayer, TransformerStack,
                                  alibi_bias, init_bert_weights, sinusoidal_positions)
from aviary.models.registry import count_parameters

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly (60x slower matmuls
# measured); one thread keeps these tiny tests fast.
torch.set_num_threads(1)


def test_padding_mask():
    m = padding_mask(torch.tensor([3, 1, 0]), 4)
    assert m.tolist() == [[False, False, False, True], [False, True, True, True], [True] * 4]


def test_sinusoidal_positions_match_formula():
    pe = sinusoidal_positions(50, 16)
    t, i = 7, 3
    assert pe.shape == (50, 16)
    assert pe[t, 2 * i].item() == pytest.approx(math.sin(t / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(t / 10000 ** (2 * i / 16)), abs=1e-6)
    assert sinusoidal_positions(5, 7).shape == (5, 7)


def test_sdpa_equals_explicit_softmax_with_padding():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, attn_dropout=0.1).eval()
    x = torch.randn(3, 10, 32)
    kpm = padding_mask(torch.tensor([10, 6, 1]), 10)
    out_fast, none = attn(x, kpm)
    out_slow, probs = attn(x, kpm, need_weights=True)
    assert none is None and probs.shape == (3, 4, 10, 10)
    torch.testing.assert_close(out_fast, out_slow, atol=1e-5, rtol=1e-5)
    # Probabilities sum to one and never touch padded keys.
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 10))
    assert probs[1, :, :, 6:].abs().max() == 0


def test_alibi_bias_values():
    b = alibi_bias(4, 6)
    assert b.shape == (4, 6, 6)
    # Slopes 2^(-8h/H): 1/4, 1/16, 1/64, 1/256 for 4 heads; symmetric, zero on the diagonal.
    assert b[0, 1, 4].item() == pytest.approx(-3 / 4)
    assert b[3, 5, 0].item() == pytest.approx(-5 / 256)
    torch.testing.assert_close(b, b.transpose(1, 2))
    assert b.diagonal(dim1=1, dim2=2).abs().max() == 0
    # Rescaled so head 0's slope is 1; the ratio between heads is kept.
    s = alibi_bias(4, 3, first_slope=1.0)[:, 0, 1]
    torch.testing.assert_close(s, torch.tensor([-1.0, -1 / 4, -1 / 16, -1 / 64]))


def test_alibi_sdpa_equals_explicit_with_padding_and_prefers_neighbours():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, attn_dropout=0.0).eval()
    x = torch.randn(3, 10, 32)
    kpm = padding_mask(torch.tensor([10, 6, 1]), 10)
    bias = alibi_bias(4, 10)
    out_fast, _ = attn(x, kpm, attn_bias=bias)
    out_slow, probs = attn(x, kpm, need_weights=True, attn_bias=bias)
    torch.testing.assert_close(out_fast, out_slow, atol=1e-5, rtol=1e-5)
    assert probs[1, :, :, 6:].abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 10))
    # Identical keys: attention is the bias alone, so the steepest head decays with distance.
    same = torch.zeros(1, 10, 32)
    _, p = attn(same, need_weights=True, attn_bias=bias)
    assert p[0, 0, 5, 5] > p[0, 0, 5, 6] > p[0, 0, 5, 8]
    torch.testing.assert_close(p[0, 0, 5, 4], p[0, 0, 5, 6])
    with pytest.raises(ValueError, match="attn_bias"):
        attn(x, attn_bias=alibi_bias(2, 10))


@pytest.mark.parametrize("pre_ln,bias", [(False, "none"), (True, "none"), (False, "alibi")])
def test_padded_batch_equals_one_by_one(pre_ln, bias):
    torch.manual_seed(0)
    stack = TransformerStack(2, hidden_size=16, num_heads=2, ffn_size=32, pre_ln=pre_ln,
                             position_bias=bias).eval()
    lengths = torch.tensor([9, 4])
    x = torch.randn(2, 9, 16)
    hs, _ = stack(x, padding_mask(lengths, 9))
    for b, n in enumerate(lengths.tolist()):
        hs1, _ = stack(x[b:b + 1, :n])
        for layer in range(3):
            torch.testing.assert_close(hs[layer][b, :n], hs1[layer][0], atol=1e-5, rtol=1e-5)


def test_stack_max_layer_and_attentions():
    stack = TransformerStack(3, hidden_size=8, num_heads=2, ffn_size=16).eval()
    x = torch.randn(1, 5, 8)
    hs, att = stack(x, need_weights=True)
    assert len(hs) == 4 and len(att) == 3 and hs[0] is x
    hs, att = stack(x, max_layer=1)
    assert len(hs) == 2 and att is None
    full, _ = stack(x)
    torch.testing.assert_close(hs[1], full[1])
    assert len(stack(x, max_layer=0)[0]) == 1


def test_shared_layers_share_parameters():
    shared = TransformerStack(4, share_layers=True, hidden_size=8, num_heads=2, ffn_size=16)
    single = TransformerLayer(8, 2, 16)
    assert len(shared.layers) == 1
    assert count_parameters(shared) == count_parameters(single)
    assert shared.layer(0) is shared.layer(3)
    # A gradient through a deep shared stack lands on the one parameter set.
    hs, _ = shared(torch.randn(1, 3, 8))
    hs[-1].sum().backward()
    assert shared.layers[0].attn.q_proj.weight.grad is not None


def test_bert_layer_parameter_count():
    # REFERENCE.md: one 768/3072 layer has 7.088M parameters.
    layer = TransformerLayer(768, 12, 3072)
    assert count_parameters(layer) == 7_087_872
    assert {"attn", "ln_attn", "ffn", "ln_ffn"} <= dict(layer.named_children()).keys()


def test_init_and_activation_errors():
    ffn = FeedForward(8, 16, 0.0)
    ffn.apply(init_bert_weights)
    assert ffn.fc1.bias.abs().max() == 0
    assert 0.01 < ffn.fc1.weight.std().item() < 0.03
    with pytest.raises(ValueError, match="swish"):
        FeedForward(8, 16, 0.0, activation="swish")
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadSelfAttention(10, 3)


def test_fast_dropout_rate_scale_and_gradient():
    from aviary.models.layers import fast_dropout
    torch.manual_seed(0)
    x = torch.ones(400, 1000, requires_grad=True)
    y = fast_dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    assert fast_dropout(x, 0.0) is x


def test_training_attention_path_matches_eval_without_dropout():
    # The explicit CPU training path (used when attn_dropout > 0) computes the same attention.
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, attn_dropout=1e-9)
    x = torch.randn(2, 7, 32)
    kpm = padding_mask(torch.tensor([7, 4]), 7)
    train_out, _ = attn.train()(x, kpm)
    eval_out, _ = attn.eval()(x, kpm)
    torch.testing.assert_close(train_out, eval_out, atol=1e-5, rtol=1e-5)
