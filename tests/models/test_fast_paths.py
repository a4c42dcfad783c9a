"""The bf16 CPU fast paths of aviary.models.layers and the fused AdamW: same results within tolerance."""
import copy

import pytest
import torch

from aviary.models import layers
from aviary.models.layers import Dropout, MultiHeadSelfAttention, alibi_bias


@pytest.fixture
def fast_paths_off():
    def set_(on: bool):
        layers.BF16_FAST_PATHS = on
    yield set_
    layers.BF16_FAST_PATHS = True


@pytest.mark.parametrize("bias", [False, True])
def test_explicit_bf16_attention_equals_sdpa(fast_paths_off, bias):
    torch.manual_seed(0)
    att = MultiHeadSelfAttention(64, 4, attn_dropout=0.0).train()
    x = torch.randn(3, 40, 64)
    kpm = torch.arange(40)[None, :] >= torch.tensor([40, 31, 17])[:, None]
    ab = alibi_bias(4, 40, first_slope=1.0) if bias else None
    outs, grads = [], []
    for on in (True, False):  # True: explicit path (T <= 512, bf16, grad); False: SDPA
        fast_paths_off(on)
        a = copy.deepcopy(att)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = a(xi, kpm, attn_bias=ab)
        valid = (~kpm)[..., None].float()
        (out.float() * valid).square().sum().backward()
        outs.append(out.float() * valid)
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-2)


def test_explicit_path_only_for_short_bf16_sequences_with_grad():
    q = torch.randn(1, 2, 100, 8, dtype=torch.bfloat16, requires_grad=True)
    assert layers._explicit_bf16_attention(q)
    assert not layers._explicit_bf16_attention(q.detach())  # no grad: extraction keeps SDPA
    assert not layers._explicit_bf16_attention(q.float())  # fp32 keeps SDPA
    long = torch.randn(1, 2, layers.EXPLICIT_BF16_MAX_T + 1, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not layers._explicit_bf16_attention(long)


def test_dropout_fp32_is_nn_dropout_and_bf16_keeps_the_rate():
    d, ref = Dropout(0.1).train(), torch.nn.Dropout(0.1).train()
    x = torch.randn(64, 1000)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    assert torch.equal(a, ref(x))  # fp32: the same masks as before
    xb = torch.ones(200, 1000, dtype=torch.bfloat16)
    y = d(xb)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0].float(), torch.tensor(1 / (1 - 0.1)), rtol=1e-2)
    assert torch.equal(d.eval()(xb), xb)


def test_fused_adamw_matches_the_for_loop_adamw():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    nets = [copy.deepcopy(net), copy.deepcopy(net)]
    opts = [torch.optim.AdamW(nets[0].parameters(), lr=1e-2, weight_decay=0.01),
            torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=0.01, fused=True)]
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    for _ in range(20):
        for n, o in zip(nets, opts):
            (n(x) - y).abs().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
