"""Bad data at scale: `aviary check-data` finds every broken file; training data skips them."""
import json

import numpy as np
import soundfile as sf
import torch

from aviary.cli import main
from aviary.data import AudioDataset, DurationBatchSampler, Utterance, collate_audio, write_manifest
from aviary.data.check import check_corpus


def _bad_corpus(d):
    """Eight good files and one of each kind of broken or odd file."""
    rng = np.random.default_rng(0)
    tone = lambda n: (0.1 * np.sin(np.arange(n) / 5) + rng.normal(0, 0.01, n)).astype(np.float32)
    utts = []

    def add(name, dur, sr=16000):
        utts.append(Utterance(id=name, audio=f"{name}.{'flac' if name.startswith('good') else 'wav'}",
                              duration=dur, sample_rate=sr, speaker=name[:4]))

    for i in range(8):
        sf.write(d / f"good{i}.flac", tone(16000), 16000)
        add(f"good{i}", 1.0)
    sf.write(d / "corrupt.wav", tone(8000), 16000)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(200))
    add("corrupt", 0.5)
    (d / "empty.wav").write_bytes(b"")
    add("empty", 1.0)
    x = tone(8000)
    x[10] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    add("nan", 0.5)
    sf.write(d / "rate.wav", tone(22050), 22050)
    add("rate", 1.0, 22050)
    sf.write(d / "u8.wav", tone(16000), 16000, subtype="PCM_U8")
    add("u8", 1.0)
    sf.write(d / "ch3.wav", np.stack([tone(16000)] * 3, 1), 16000)
    add("ch3", 1.0)
    sf.write(d / "short.wav", tone(160), 16000)
    add("short", 0.01)
    sf.write(d / "long.wav", tone(16000 * 65), 16000, subtype="PCM_U8")  # 65 s (small on disk)
    add("long", 65.0)
    sf.write(d / "trunc.wav", tone(16000), 16000)
    (d / "trunc.wav").write_bytes((d / "trunc.wav").read_bytes()[:20000])
    add("trunc", 1.0)
    add("missing", 1.0)
    write_manifest(d / "manifest.jsonl", utts)
    return d / "manifest.jsonl"


def test_check_data_finds_every_problem(tmp_path, capsys):
    m = _bad_corpus(tmp_path)
    rep = check_corpus(m, progress=False)
    kinds = {k: sorted(uid for uid, _ in v) for k, v in rep.problems.items() if v}
    assert kinds["corrupt"] == ["corrupt"] and kinds["empty"] == ["empty"]
    assert kinds["nonfinite"] == ["nan"] and kinds["too_short"] == ["short"]
    assert kinds["truncated"] == ["trunc"] and kinds["missing"] == ["missing"]
    assert kinds["resampled"] == ["rate"] and kinds["low_bit_depth"] == ["long", "u8"]
    assert kinds["multichannel"] == ["ch3"] and kinds["long"] == ["long"]
    assert rep.bad_ids() == {"corrupt", "empty", "nan", "short", "trunc", "missing"}
    assert rep.num_ok == 8 + 4
    rc = main(["check-data", str(m), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "ERRORS" in out and "nonfinite: 1" in out and "trunc.wav" in out
    assert json.loads((tmp_path / "r.json").read_text())["num_errors"] == 6


def test_check_data_clean_corpus_exit_0(tmp_path):
    sf.write(tmp_path / "a.flac", np.full(16000, 0.1, np.float32), 16000)
    write_manifest(tmp_path / "m.jsonl", [Utterance("a", "a.flac", 1.0, 16000, "s")])
    assert main(["check-data", str(tmp_path / "m.jsonl")]) == 0


def test_training_data_skips_broken_and_crops_long(tmp_path):
    from aviary.data import load_manifest
    utts = load_manifest(_bad_corpus(tmp_path))
    ds = AudioDataset(utts, max_seconds=4.0, skip_bad=True)
    sampler = DurationBatchSampler(ds.durations, max_seconds=8.0, seed=0)
    seen, skipped = [], 0
    for batch_idx in sampler:
        b = collate_audio([ds[i] for i in batch_idx])
        seen += b["ids"]
        skipped += b["num_skipped"]
        assert b["wavs"].shape[1] <= 4 * 16000 and torch.all(torch.isfinite(b["wavs"]))
    assert skipped == 6 and sorted(ds.bad) == ["corrupt", "empty", "missing", "nan", "short", "trunc"]
    assert sorted(seen) == sorted(u.id for u in utts if u.id not in ds.bad)  # nothing else lost
