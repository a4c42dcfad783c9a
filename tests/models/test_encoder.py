"""Continuous-frame encoder: reference parameter counts, stacking, padding invariance."""
import pytest
import torch

from aviary.config import ConfigError
from aviary.models.encoder import EncoderConfig, TransformerEncoder, stack_frames
from aviary.models.heads import SpecHead
from aviary.models.registry import count_parameters

# Two OpenMP threads on a CPU shared with other jobs spin-wait badly (60x slower matmuls
# measured); one thread keeps these tiny tests fast.
torch.set_num_threads(1)

TINY = dict(hidden_size=16, num_layers=2, num_heads=2, ffn_size=32)


@pytest.mark.parametrize("layers,shared,expected", [
    (3, False, 21_327_360),   # Mockingjay BASE / TERA base: 21.33M
    (12, False, 85_118_208),  # Mockingjay LARGE: 85.12M
    (3, True, 7_151_616),     # Audio ALBERT, any depth: 7.15M
    (12, True, 7_151_616),
])
def test_reference_parameter_counts(layers, shared, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        enc = TransformerEncoder(EncoderConfig(num_layers=layers, share_layers=shared), input_dim=80)
    assert count_parameters(enc) == expected
    assert round(count_parameters(enc) / 1e6, 2) == round(expected / 1e6, 2)


def test_albert_ratio_matches_paper():
    with torch.device("meta"):
        big = count_parameters(TransformerEncoder(EncoderConfig(num_layers=12), 80))
        albert = count_parameters(TransformerEncoder(EncoderConfig(num_layers=12, share_layers=True), 80))
    assert abs(1 - albert / big - 0.916) < 0.001  # "91.6 % fewer"


def test_stack_frames_ceil_and_zero_fill():
    x = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 7, 2) + 1
    s, n = stack_frames(x, torch.tensor([7, 4]), 3)
    assert s.shape == (2, 3, 6) and n.tolist() == [3, 2]
    assert torch.equal(s[0, 0], x[0, :3].reshape(-1))
    assert torch.equal(s[0, 2], torch.cat([x[0, 6], torch.zeros(4)]))  # incomplete group zero-filled
    assert torch.equal(s[1, 1], torch.cat([x[1, 3], torch.zeros(4)]))   # frames past length zeroed


@pytest.mark.parametrize("R", [1, 3])
def test_padded_batch_equals_one_by_one(R):
    torch.manual_seed(0)
    enc = TransformerEncoder(EncoderConfig(**TINY, downsample=R), input_dim=5).eval()
    lengths = torch.tensor([20, 13, 1])
    x = torch.randn(3, 20, 5)
    hs, out_len, _ = enc(x, lengths)
    assert out_len.tolist() == [-(-n // R) for n in lengths.tolist()]
    for b, n in enumerate(lengths.tolist()):
        hs1, n1, _ = enc(x[b:b + 1, :n], lengths[b:b + 1])
        k = int(n1)
        for i in range(3):
            torch.testing.assert_close(hs[i][b, :k], hs1[i][0], atol=1e-5, rtol=1e-5)


def test_max_layer_attentions_and_shared_gradients():
    enc = TransformerEncoder(EncoderConfig(**TINY, share_layers=True), input_dim=4).eval()
    x, n = torch.randn(2, 9, 4), torch.tensor([9, 6])
    hs, _, att = enc(x, n, need_weights=True)
    assert len(hs) == 3 and len(att) == 2 and att[0].shape == (2, 2, 9, 9)
    assert len(enc(x, n, max_layer=1)[0]) == 2
    assert len(enc.layers.layers) == 1
    enc.train()
    enc(x, n)[0][-1].sum().backward()
    assert enc.layers.layers[0].ffn.fc1.weight.grad.abs().sum() > 0


def test_errors_name_shapes_and_keys():
    enc = TransformerEncoder(EncoderConfig(**TINY), input_dim=4)
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        enc(torch.randn(1, 3, 5), torch.tensor([3]))
    with pytest.raises(ValueError, match="frame"):
        enc(torch.randn(1, 3, 4), torch.tensor([0]))
    with pytest.raises(ConfigError, match="hidden_size"):
        EncoderConfig(hidden_size=10, num_heads=3)


def test_spec_head_unfolds_to_original_rate():
    head = SpecHead(16, target_dim=5, downsample=3)
    y = head(torch.randn(2, 4, 16))
    assert y.shape == (2, 12, 5)
    assert count_parameters(head) == 16 * 16 + 16 + 32 + 16 * 15 + 15
