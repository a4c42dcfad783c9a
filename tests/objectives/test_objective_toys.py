"""Objective modules on hand-made upstreams (their Protocols): hand-computed toy losses.

An objective knows the upstream only through the attributes it uses, so a few lines of
fake upstream pin everything the encoder would decide, and the loss follows by hand.
"""
import math

import torch
import torch.nn as nn

from aviary.objectives.masking import MaskingConfig
from aviary.objectives.mlm import MaskedLM
from aviary.objectives.reconstruction import MaskedReconstruction


class _Encoder:
    downsample = 1

    def stack(self, feats, lengths):
        return feats, lengths

    def encode(self, x, lengths):
        return [torch.zeros(*x.shape[:2], 4)], None  # hidden size 4, all zero


class _FrameUpstream:
    encoder = _Encoder()

    def __init__(self, feats):
        self.feats = feats

    def as_batch(self, wavs, wav_lengths, check_finite=True):
        return wavs, wav_lengths

    def features(self, wavs, wav_lengths):
        return self.feats, wav_lengths


def test_masked_reconstruction_toy_loss():
    # Predictions are 0 (a zero head on zero hidden states): the loss is the mean |target|
    # over the pinned masked frames, here frames 1 and 2 of row 0 and frame 0 of row 1.
    feats = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0]],
                          [[7.0, 8.0], [0.5, 0.5], [9.0, 9.0]]])  # (B=2, T=3, D=2)
    lengths = torch.tensor([3, 2])
    head = nn.Linear(4, 2)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    obj = MaskedReconstruction(MaskingConfig(zero_prob=1.0, random_prob=0.0), head, target_dim=2)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    out = obj(_FrameUpstream(feats), {"wavs": torch.zeros(2, 10), "wav_lengths": lengths, "mask": mask})
    expect = (3 + 4 + 5 + 6 + 7 + 8) / 6
    assert math.isclose(out.loss.item(), expect, rel_tol=1e-6)
    assert out.metrics["masked_frames"].item() == 3
    assert math.isclose(out.metrics["masked_frac"].item(), 3 / 5, rel_tol=1e-6)
    assert torch.equal(out.extras["inputs"][mask], torch.zeros(3, 2))  # zeroed (zero_prob 1)


class _TokenUpstream:
    def __init__(self, vocab, hidden=4):
        self.embed_tokens = nn.Embedding(vocab, hidden)

    def forward_tokens(self, tokens, lengths):
        return [torch.zeros(*tokens.shape, self.embed_tokens.embedding_dim)], None


class _ConstantHead(nn.Module):
    def forward(self, x, embedding):
        return torch.zeros(x.shape[0], embedding.shape[0])  # uniform over the vocabulary


def test_masked_lm_toy_loss():
    V = 10
    obj = MaskedLM(_ConstantHead(), vocab_size=V, mask_id=2, first_regular=3, replace_probs=(1.0, 0.0, 0.0))
    tokens = torch.tensor([[3, 4, 5, 6], [7, 3, 0, 0]])
    mask = torch.tensor([[True, False, True, False], [False, True, False, False]])
    out = obj(_TokenUpstream(V), {"tokens": tokens, "lengths": torch.tensor([4, 2]), "mask": mask})
    assert math.isclose(out.loss.item(), math.log(V), rel_tol=1e-6)  # uniform logits
    assert out.metrics["num_masked"].item() == 3
    assert math.isclose(out.metrics["masked_frac"].item(), 3 / 6, rel_tol=1e-6)
    assert math.isclose(out.metrics["unigram_accuracy"].item(), 2 / 3, rel_tol=1e-6)  # targets 3, 5, 3: id 3 is the unigram
    assert out.metrics["mask_accuracy"].item() == out.metrics["accuracy"].item()  # every masked input is <mask>
