"""HuBERT-style objective: cosine logits over cluster embeddings, masked CE, alignment."""
from __future__ import annotations

import math

import pytest
import torch

from aviary.objectives.hubert import IGNORE, HubertConfig, align_targets, cosine_cluster_loss
from tests.objectives.test_bestrq import _FeatUpstream, _batch

torch.set_num_threads(1)


def test_cosine_cluster_loss_hand_computed():
    # K = 3 cluster embeddings in 2-d (lengths do not matter: cosine), tau = 0.5.
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    proj = torch.tensor([[[1.0, 1.0], [5.0, 0.0], [0.0, -3.0], [1.0, 0.0]]])  # (1, 4, 2)
    targets = torch.tensor([[1, 0, 2, IGNORE]])
    mask = torch.tensor([[True, False, True, True]])  # frame 3 masked but without a target
    tau = 0.5
    r = 1 / math.sqrt(2)

    def nll(cos, k):
        z = [c / tau for c in cos]
        return -(z[k] - math.log(sum(math.exp(v) for v in z)))

    # frame 0: direction (r, r): cosines (r, r, -1); frame 2: (0, -1): cosines (0, -1, r).
    expect = (nll([r, r, -1.0], 1) + nll([0.0, -1.0, r], 2)) / 2
    out = cosine_cluster_loss(proj, emb, targets, mask, tau)
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert out.metrics["masked_frames"] == 2
    # frame 0: tie r, r -> argmax 0 (wrong); frame 2: argmax 2 (right).
    assert float(out.metrics["acc"]) == pytest.approx(0.5)
    assert out.metrics["unigram_ce"] == pytest.approx(math.log(2))
    # Scaling a projected frame or an embedding changes nothing (cosine).
    assert cosine_cluster_loss(proj * 3, emb * 0.1, targets, mask, tau).loss.item() == pytest.approx(expect, rel=1e-6)


def test_align_targets_cuts_pads_and_ignores_padding():
    t = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    out = align_targets(t, torch.tensor([4, 2]), 4)
    assert out.tolist() == [[1, 2, 3, 4], [6, 7, IGNORE, IGNORE]]
    out = align_targets(t[:, :3], torch.tensor([5, 3]), 5)
    assert out.tolist() == [[1, 2, 3, IGNORE, IGNORE], [6, 7, 8, IGNORE, IGNORE]]
    with pytest.raises(ValueError, match="targets must be"):
        align_targets(t[0], torch.tensor([4]), 4)


def _objective(K=5, R=2, D=4):
    torch.manual_seed(0)
    cfg = HubertConfig(num_clusters=K, proj_dim=8, mask_prob=0.2, span=2)
    up = _FeatUpstream(D, R)
    return cfg.build(up), up


def test_masked_frames_get_the_mask_embedding_and_only_they_are_scored():
    obj, up = _objective()
    obj.eval()
    up.eval()
    feats = torch.randn(2, 12, 4)
    lengths = torch.tensor([12, 9])
    up.feats = feats
    targets = torch.randint(0, 5, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = True
    batch = {**_batch(feats, lengths), "targets": targets, "mask": mask}
    out = obj(up, batch)
    # Row 1 has ceil(9 / 2) = 5 frames: target 5 is ignored.
    assert out.extras["targets"][1, 5] == IGNORE
    assert out.metrics["masked_frames"] == 2
    # Changing the targets of unmasked frames changes nothing; a masked one does.
    t2 = targets.clone()
    t2[0, 0] = (t2[0, 0] + 1) % 5
    assert obj(up, {**batch, "targets": t2}).loss.item() == out.loss.item()
    t3 = targets.clone()
    t3[0, 2] = (t3[0, 2] + 1) % 5
    assert obj(up, {**batch, "targets": t3}).loss.item() != out.loss.item()
    # The masked input frames are the mask embedding: their content cannot reach the encoder.
    changed = feats.clone()
    changed[0, 4:6] += 3.0
    up.feats = changed
    assert obj(up, {**batch, "targets": targets}).loss.item() == out.loss.item()
    out.loss.backward()
    assert obj.mask_embedding.grad is not None and obj.cluster_emb.grad is not None


def test_missing_targets_are_a_clear_error():
    obj, up = _objective()
    up.feats = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="aviary targets kmeans"):
        obj(up, _batch(up.feats, torch.tensor([4])))
