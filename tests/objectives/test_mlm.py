"""Span masking, 80/10/10 corruption and the masked-LM loss."""
import math

import pytest
import torch

from aviary.objectives.masking import bernoulli_span_mask
from aviary.objectives.mlm import corrupt_tokens, masked_lm_loss


def test_span_mask_never_touches_padding_and_is_seeded():
    lengths = torch.tensor([100, 37, 5, 0])
    a = bernoulli_span_mask(lengths, 100, 0.05, 10, generator=torch.Generator().manual_seed(0))
    b = bernoulli_span_mask(lengths, 100, 0.05, 10, generator=torch.Generator().manual_seed(0))
    c = bernoulli_span_mask(lengths, 100, 0.05, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    pad = torch.arange(100)[None] >= lengths[:, None]
    assert not (a & pad).any()
    assert a[:3].any(1).all()  # every non-empty row has a target
    assert not a[3].any()


def test_span_mask_spans_and_fraction():
    # Hand-set starts: p=1 at every position means everything valid is masked.
    full = bernoulli_span_mask(torch.tensor([12]), 12, 1.0, 3)
    assert full.all()
    # The masked fraction approaches 1 - (1 - p)^M = 0.401 for p = 0.05, M = 10.
    lengths = torch.full((64,), 1000)
    m = bernoulli_span_mask(lengths, 1000, 0.05, 10, generator=torch.Generator().manual_seed(0))
    frac = m.float().mean().item()
    assert frac == pytest.approx(1 - 0.95 ** 10, abs=0.02)
    # masked runs come in lengths >= M (overlapping spans merge), except where cut by the end
    row = m[0].tolist() + [False]
    runs, n = [], 0
    for x in row:
        if x:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert min(runs[:-1]) >= 10


def test_single_start_gives_one_span():
    torch.manual_seed(0)
    m = bernoulli_span_mask(torch.tensor([30]), 30, 1e-9, 4, min_masked=1)  # no draws: one forced span
    idx = m[0].nonzero().flatten().tolist()
    assert len(idx) == 4 or idx[-1] == 29
    assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_corruption_proportions_and_unmasked_untouched():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 50, (64, 500), generator=g)
    mask = torch.rand(64, 500, generator=g) < 0.4
    out = corrupt_tokens(tokens, mask, mask_id=2, vocab_size=50, first_regular=3, generator=g)
    assert torch.equal(out[~mask], tokens[~mask])
    n = mask.sum().item()
    to_mask = (out[mask] == 2).float().sum().item() / n
    same = (out[mask] == tokens[mask]).float().sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert same == pytest.approx(0.1 + 0.1 / 47, abs=0.02)  # keep, plus random hitting the same id
    assert (out >= 2).all()  # never padding / unk


def test_masked_lm_loss_only_masked_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 2.0  # position 0 predicts 1
    logits[0, 2, 3] = 100.0  # unmasked garbage must not count
    targets = torch.tensor([[1, 2, 2]])  # position 1: flat logits, argmax 0 != 2
    mask = torch.tensor([[True, True, False]])
    res = masked_lm_loss(logits, targets, mask)
    loss, m = res.loss, res.metrics
    e2 = math.exp(2.0)
    expect = (-math.log(e2 / (e2 + 3)) - math.log(1 / 4)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["unigram_accuracy"].item() == pytest.approx(0.5)  # targets {1, 2}: mode covers half
    assert m["batch_mode_accuracy"].item() == pytest.approx(0.5)
    assert m["num_masked"].item() == 2


def test_unigram_baseline():
    targets = torch.tensor([5, 5, 5, 1])
    logits = torch.zeros(4, 8)
    logits[:, 5] = 1.0
    m = masked_lm_loss(logits, targets, None).metrics
    assert m["unigram_accuracy"].item() == pytest.approx(0.75) and m["accuracy"].item() == pytest.approx(0.75)


def test_unigram_baseline_uses_the_corpus_mode_not_the_batch_mode():
    # The batch's most frequent target (5) is not the corpus's (3): a context-free model that
    # learned the corpus counts guesses 3 everywhere; guessing 5 needs to see the batch.
    targets = torch.tensor([5, 5, 5, 3, 7])
    m = masked_lm_loss(torch.zeros(5, 8), targets, None, unigram_id=3).metrics
    assert m["unigram_accuracy"].item() == pytest.approx(0.2)
    assert m["batch_mode_accuracy"].item() == pytest.approx(0.6)
    m = masked_lm_loss(torch.zeros(5, 8), targets, None, unigram_id=4).metrics  # never a target
    assert m["unigram_accuracy"].item() == 0.0


def test_mask_accuracy_counts_only_hidden_targets():
    targets = torch.tensor([1, 2, 3, 4])
    logits = torch.nn.functional.one_hot(torch.tensor([1, 2, 0, 0]), 8).float()  # right on 0, 1
    m = masked_lm_loss(logits, targets, None, hidden=torch.tensor([False, True, True, True])).metrics
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["mask_accuracy"].item() == pytest.approx(1 / 3)
    m = masked_lm_loss(logits, targets, None).metrics
    assert "mask_accuracy" not in m
