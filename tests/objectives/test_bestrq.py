"""BEST-RQ: the frozen random-projection quantiser, the masked code loss, the objective."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from aviary.models.encoder import EncoderConfig, TransformerEncoder
from aviary.objectives.bestrq import BestRQ, BestRQConfig, RandomProjectionQuantizer, masked_code_loss

torch.set_num_threads(1)


def test_quantizer_picks_the_code_of_largest_cosine_by_hand():
    q = RandomProjectionQuantizer(input_dim=2, codebook_size=3, codebook_dim=2, num_codebooks=1)
    # A = identity; codes at 0, 90 and 225 degrees.
    q.projection.copy_(torch.eye(2)[None])
    q.codebooks.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.7071068, -0.7071068]]]))
    x = torch.tensor([[[3.0, 0.1], [0.2, 5.0], [-1.0, -2.0], [10.0, 9.0]]])  # (1, 4, 2)
    # cosines: frame 0 -> code 0; frame 1 -> code 1; frame 2 -> code 2; frame 3 (angle 42 deg) -> code 0.
    assert q(x).tolist() == [[[0], [1], [2], [0]]]
    # The scale of the input does not matter (cosine), only its direction.
    assert torch.equal(q(x * 7.5), q(x))


def test_quantizer_init_is_seeded_xavier_and_unit_codes():
    a = RandomProjectionQuantizer(320, 8192, 16, num_codebooks=2, seed=3)
    torch.manual_seed(123)  # the run's seed does not enter
    b = RandomProjectionQuantizer(320, 8192, 16, num_codebooks=2, seed=3)
    c = RandomProjectionQuantizer(320, 8192, 16, num_codebooks=2, seed=4)
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.projection, c.projection)
    assert a.projection.shape == (2, 320, 16) and a.codebooks.shape == (2, 8192, 16)
    bound = math.sqrt(6 / (320 + 16))  # Xavier uniform
    assert float(a.projection.abs().max()) <= bound and float(a.projection.abs().max()) > 0.9 * bound
    assert torch.allclose(a.codebooks.norm(dim=-1), torch.ones(2, 8192), atol=1e-6)
    assert list(a.parameters()) == []  # nothing to train
    assert set(a.state_dict()) == {"projection", "codebooks"}  # but saved with the model


def test_masked_code_loss_hand_computed():
    # B=1, T=3, N=2 codebooks, K=2 codes; frames 0 and 2 masked.
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]],
                            [[9.0, -9.0], [9.0, -9.0]],  # unmasked: never scored
                            [[0.0, 1.0], [3.0, 1.0]]]])
    targets = torch.tensor([[[0, 1], [1, 1], [1, 1]]])
    mask = torch.tensor([[True, False, True]])

    def nll(z, k):
        return -(z[k] - math.log(sum(math.exp(v) for v in z)))

    expect = (nll([2, 0], 0) + nll([0, 0], 1) + nll([0, 1], 1) + nll([3, 1], 1)) / 4
    out = masked_code_loss(logits, targets, mask)
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    # argmax: [0, 0(tie->0)] vs [0, 1] -> 1 right; [1, 0] vs [1, 1] -> 1 right: 2 of 4.
    assert float(out.metrics["acc"]) == pytest.approx(0.5)
    # masked targets per codebook: cb0 {0, 1} -> ln 2; cb1 {1, 1} -> 0; mean ln2 / 2.
    assert out.metrics["unigram_ce"] == pytest.approx(math.log(2) / 2)
    assert out.metrics["masked_frames"] == 2
    # A change of an unmasked frame's logits changes nothing.
    logits2 = logits.clone()
    logits2[0, 1] = 0.0
    assert masked_code_loss(logits2, targets, mask).loss.item() == out.loss.item()


class _FeatUpstream(torch.nn.Module):
    """An upstream whose 'front-end' hands back given features (B, T, D): the objective's
    masking and targets can then be tested on exact inputs."""

    hidden_size = 16

    def __init__(self, D=4, R=2):
        super().__init__()
        self.encoder = TransformerEncoder(EncoderConfig(hidden_size=16, num_layers=1, num_heads=2, ffn_size=32,
                                                        dropout=0.0, attn_dropout=0.0, downsample=R), D)
        self.frontend = SimpleNamespace(dim=D)
        self.feats = None

    def as_batch(self, wavs, wav_lengths, check_finite=True):
        return wavs, wav_lengths

    def features(self, wavs, wav_lengths):
        return self.feats, wav_lengths


def _objective(D=4, R=2, **kw):
    cfg = BestRQConfig(codebook_size=16, codebook_dim=4, mask_prob=0.2, span=2, **kw)
    torch.manual_seed(0)
    up = _FeatUpstream(D, R)
    return cfg.build(up), up


def _batch(feats, lengths):
    return {"wavs": torch.zeros(feats.shape[0], feats.shape[1]), "wav_lengths": lengths}


def test_targets_never_depend_on_masked_inputs():
    obj, up = _objective()
    obj.eval()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 12, 4, generator=g)  # T'=6 encoder frames of R=2
    lengths = torch.tensor([12, 10])
    up.feats = feats
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 3] = True
    out = obj(up, {**_batch(feats, lengths), "mask": mask}, generator=torch.Generator().manual_seed(1))
    # Targets are the quantiser's codes of the CLEAN stacked input, whatever the mask.
    stacked, _ = up.encoder.stack(feats, lengths)
    assert torch.equal(out.extras["targets"], obj.quantizer(stacked))
    other = obj(up, {**_batch(feats, lengths), "mask": ~mask & (torch.arange(6) < torch.tensor([[6], [5]]))},
                generator=torch.Generator().manual_seed(2))
    assert torch.equal(other.extras["targets"], out.extras["targets"])
    # Masked frames are N(0, noise_std) noise: the encoder never sees what they held. Changing
    # the features under the mask leaves the encoder input (hence every prediction) as it was.
    changed = feats.clone()
    changed[0, 2:6] += 5.0  # encoder frames 1-2 of row 0
    changed[1, 6:8] -= 3.0  # encoder frame 3 of row 1
    up.feats = changed
    again = obj(up, {**_batch(changed, lengths), "mask": mask}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.extras["inputs"], out.extras["inputs"])
    noise = out.extras["inputs"][mask]
    assert not torch.equal(noise, stacked[mask])
    # ... while their targets do follow the clean input (the task is to predict them).
    assert not torch.equal(again.extras["targets"][mask], out.extras["targets"][mask])
    assert torch.equal(again.extras["targets"][~mask], out.extras["targets"][~mask])


def test_noise_has_the_configured_std_and_padding_is_never_masked():
    obj, up = _objective(noise_std=0.1)
    feats = torch.randn(4, 400, 4)
    lengths = torch.tensor([400, 300, 200, 50])
    up.feats = feats
    out = obj(up, _batch(feats, lengths), generator=torch.Generator().manual_seed(0))
    mask = out.extras["mask"]
    T = mask.shape[1]
    assert not (mask & (torch.arange(T)[None] >= torch.tensor([200, 150, 100, 25])[:, None])).any()
    assert float(out.extras["inputs"][mask].std()) == pytest.approx(0.1, rel=0.1)
    out.loss.backward()
    assert obj.head.weight.grad is not None and obj.quantizer.projection.grad is None


def test_several_codebooks_average_their_losses():
    obj, up = _objective(num_codebooks=3)
    feats = torch.randn(2, 12, 4)
    up.feats = feats
    out = obj(up, _batch(feats, torch.tensor([12, 12])), generator=torch.Generator().manual_seed(0))
    t = out.extras["targets"]
    assert t.shape == (2, 6, 3)
    # Different random projections give different codes.
    assert not (torch.equal(t[..., 0], t[..., 1]) and torch.equal(t[..., 1], t[..., 2]))


@pytest.mark.parametrize("name", ["bestrq-cpu", "hubert-cpu"])
def test_the_same_generator_gives_the_same_step_whatever_the_global_rng(name):
    from aviary.models.registry import build_pretrain, get_preset

    cfg = get_preset(name)
    torch.manual_seed(0)
    model = build_pretrain(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"wavs": torch.randn(2, 16000, generator=g) * 0.1, "wav_lengths": torch.tensor([16000, 12000]),
             "targets": torch.randint(0, 100, (2, 40), generator=g)}
    outs = []
    for seed, global_seed in ((5, 0), (5, 123), (6, 0)):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            outs.append(model(batch, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].extras["mask"], outs[1].extras["mask"])
    assert not torch.equal(outs[0].extras["mask"], outs[2].extras["mask"])
    assert 0.2 < outs[0].metrics["masked_frac"] < 0.5  # ~35 % of the frames (13 % start 3-frame spans)
