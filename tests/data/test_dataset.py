"""AudioDataset, collate and the duration sampler."""
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings, strategies as st

from aviary.audio import AudioError
from aviary.data import AudioDataset, DurationBatchSampler, Utterance, collate_audio


def _corpus(tmp_path, durs=(0.5, 1.0, 0.3, 2.0)):
    utts = []
    rng = np.random.default_rng(0)
    for i, d in enumerate(durs):
        x = rng.uniform(-0.5, 0.5, int(d * 16000)).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", x, 16000, subtype="FLOAT")
        utts.append(Utterance(id=f"u{i}", audio=str(tmp_path / f"u{i}.wav"), duration=d, sample_rate=16000,
                              speaker=f"s{i % 2}", keyword="yes" if i % 2 else "no",
                              phones=[("sil", 0.0, d / 2), ("AA", d / 2, d)]))
    return utts


def test_collate_pads_and_matches_items(tmp_path):
    ds = AudioDataset(_corpus(tmp_path))
    items = [ds[i] for i in range(4)]
    b = collate_audio(items)
    assert b["wavs"].shape == (4, 32000) and b["wavs"].dtype == torch.float32
    assert b["wav_lengths"].tolist() == [8000, 16000, 4800, 32000]
    for row, it in enumerate(items):
        n = it["wav"].numel()
        assert torch.equal(b["wavs"][row, :n], it["wav"]) and torch.all(b["wavs"][row, n:] == 0)
    assert b["ids"] == ["u0", "u1", "u2", "u3"] and b["speakers"] == ["s0", "s1", "s0", "s1"]
    assert b["keywords"] == ["no", "yes", "no", "yes"] and len(b["phones"]) == 4
    # Rounded up to a multiple (few batch shapes for oneDNN); the lengths stay the true ones.
    r = collate_audio(items, pad_to_multiple=5120)
    assert r["wavs"].shape == (4, 35840) and torch.equal(r["wav_lengths"], b["wav_lengths"])
    assert torch.equal(r["wavs"][:, :32000], b["wavs"]) and torch.all(r["wavs"][:, 32000:] == 0)


def test_random_crop_is_seeded_and_phones_follow(tmp_path):
    utts = _corpus(tmp_path)
    ds = AudioDataset(utts, max_seconds=0.4, seed=1)
    a, b = ds[3], AudioDataset(utts, max_seconds=0.4, seed=1)[3]
    assert torch.equal(a["wav"], b["wav"]) and a["wav"].numel() == 6400
    ds.set_epoch(1)
    assert ds[3]["offset"] != a["offset"]
    full = AudioDataset(utts)[3]["wav"]
    s = int(round(a["offset"] * 16000))
    assert torch.allclose(a["wav"], full[s:s + 6400])
    assert all(0 <= st_ <= en <= 0.4 + 1e-9 for _, st_, en in a["phones"])
    assert ds[2]["offset"] == 0.0  # shorter than the crop: untouched
    cached = AudioDataset(utts, max_seconds=0.4, seed=1, cache=True)
    assert torch.allclose(cached[3]["wav"], a["wav"], atol=1e-4)


def test_bad_files_raise_or_are_skipped(tmp_path):
    utts = _corpus(tmp_path)
    (tmp_path / "u1.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="u1.wav"):
        AudioDataset(utts)[1]
    ds = AudioDataset(utts, skip_bad=True)
    b = collate_audio([ds[i] for i in range(4)])
    assert b["ids"] == ["u0", "u2", "u3"] and b["num_skipped"] == 1 and list(ds.bad) == ["u1"]
    assert collate_audio([None])["wavs"].shape == (0, 0)


def test_sampler_budget_coverage_determinism():
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 8.0, 300).tolist() + [30.0]  # one over-long utterance
    s = DurationBatchSampler(d, max_seconds=20.0, seed=3)
    batches = list(s)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(d)))
    for b in batches:
        assert len(b) * max(d[i] for i in b) <= 20.0 or b == [300]
    assert [b for b in batches if 300 in b] == [[300]]
    assert batches == list(DurationBatchSampler(d, max_seconds=20.0, seed=3))
    s.set_epoch(1)
    assert list(s) != batches
    s.set_epoch(1, start_batch=5)
    assert list(s) == s.rank_batches()[5:] and len(s) == len(s.rank_batches()) - 5


def test_sampler_rank_shards():
    d = np.random.default_rng(1).uniform(1, 5, 101).tolist()
    shards = [list(DurationBatchSampler(d, 12.0, seed=0, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    sets = [{i for b in sh for i in b} for sh in shards]
    assert len({len(sh) for sh in shards}) == 1
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    padded = [list(DurationBatchSampler(d, 12.0, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(sh) for sh in padded}) == 1
    assert {i for sh in padded for b in sh for i in b} == set(range(101))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 20.0), max_size=80), st.floats(0.5, 40.0), st.integers(0, 5))
def test_sampler_properties(d, budget, seed):
    batches = list(DurationBatchSampler(d, budget, seed=seed))
    assert sorted(i for b in batches for i in b) == list(range(len(d)))
    assert all(len(b) == 1 or len(b) * max(d[i] for i in b) <= budget for b in batches)


def test_training_batches_are_padded_to_a_few_shapes(tmp_path):
    from aviary.train.data import AudioTrainData

    data = AudioTrainData(_corpus(tmp_path), max_batch_seconds=4.0, crop_seconds=4.0)
    step = round(AudioTrainData.pad_seconds * 16000)
    for idx in ([0], [0, 2], [1, 3]):
        b = data.collate([data.load_item(i, seed=0) for i in idx])
        n = int(b["wav_lengths"].max())
        assert b["wavs"].shape[1] == n + (-n % step)
