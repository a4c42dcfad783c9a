"""Preparers on a LibriSpeech-layout tree and a TextGrid set built here, and `aviary prepare`."""
import numpy as np
import pytest
import soundfile as sf

from aviary.audio import AudioError
from aviary.cli import main
from aviary.data import load_manifest
from aviary.data.alignment import AlignmentError
from aviary.data.manifest import ManifestError

TG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = {d}
tiers? <exists>
size = 1
item []:
    item [1]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = {d}
        intervals: size = 3
        intervals [1]:
            xmin = 0
            xmax = 0.1
            text = ""
        intervals [2]:
            xmin = 0.1
            xmax = 0.3
            text = "HH"
        intervals [3]:
            xmin = 0.3
            xmax = {d}
            text = "AY1"
'''


def _librispeech(root, speakers=("19", "26", "32"), chapters=("198", "495"), per=2):
    rng = np.random.default_rng(0)
    for s in speakers:
        for c in chapters:
            d = root / "train-clean-5" / s / c
            d.mkdir(parents=True)
            lines = []
            for u in range(per):
                uid = f"{s}-{c}-{u:04d}"
                sf.write(d / f"{uid}.flac", rng.normal(0, 0.1, 8000 + 1600 * u).astype(np.float32), 16000)
                lines.append(f"{uid} HELLO WORLD {u}")
            (d / f"{s}-{c}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def _textgrids(root, ids_durs):
    root.mkdir(parents=True, exist_ok=True)
    for uid, d in ids_durs:
        (root / f"{uid}.TextGrid").write_text(TG.format(d=d))
    return root


def test_prepare_librispeech_with_textgrids(tmp_path):
    root = _librispeech(tmp_path / "LibriSpeech")
    al = _textgrids(tmp_path / "align" / "19", [("19-198-0000", 0.5), ("19-198-0001", 0.6)])
    utts = load_manifest_after(main(["prepare", "librispeech", str(root), "--out", str(tmp_path / "c"),
                                     "--alignments", str(tmp_path / "align")]), tmp_path / "c")
    assert len(utts) == 12 and {u.speaker for u in utts} == {"19", "26", "32"}
    u = next(u for u in utts if u.id == "19-198-0001")
    assert u.text == "HELLO WORLD 1" and u.duration == pytest.approx(0.6)
    assert u.phones == [("sil", 0.0, 0.1), ("HH", 0.1, 0.3), ("AY", 0.3, 0.6)]
    assert sum(u.phones is not None for u in utts) == 2
    for split in ("train", "valid", "test", "train-spk", "valid-spk", "test-spk"):
        assert load_manifest(tmp_path / "c", split)
    assert "aviary prepare librispeech" in (tmp_path / "c" / "README").read_text()
    assert al.is_dir()


def load_manifest_after(rc, d):
    assert rc == 0
    return load_manifest(d, check_files=True)


def test_librispeech_bad_inputs(tmp_path):
    root = _librispeech(tmp_path / "L", speakers=("7",), chapters=("1",), per=3)
    from aviary.data.prepare import prepare_librispeech
    (root / "train-clean-5" / "7" / "1" / "7-1-0001.flac").unlink()
    with pytest.raises(ManifestError, match=r"7-1.trans.txt:2: no audio file"):
        prepare_librispeech(root, tmp_path / "c")
    (root / "train-clean-5" / "7" / "1" / "7-1-0001.flac").write_bytes(b"garbage!" * 10)
    with pytest.raises(AudioError, match="7-1-0001.flac"):
        prepare_librispeech(root, tmp_path / "c")
    utts = prepare_librispeech(root, tmp_path / "c", skip_bad=True)
    assert [u.id for u in utts] == ["7-1-0000", "7-1-0002"]
    assert "Skipped 1" in (tmp_path / "c" / "README").read_text()
    # An alignment longer than its audio does not belong to it: error, or skipped when asked.
    (root / "train-clean-5" / "7" / "1" / "7-1-0001.flac").unlink()
    (root / "train-clean-5" / "7" / "1" / "7-1.trans.txt").write_text("7-1-0000 A\n7-1-0002 B\n")
    _textgrids(tmp_path / "al", [("7-1-0000", 3.0)])
    with pytest.raises(AlignmentError, match="0000.TextGrid.*do not match"):
        prepare_librispeech(root, tmp_path / "c2", alignments=tmp_path / "al")
    assert [u.id for u in prepare_librispeech(root, tmp_path / "c2", alignments=tmp_path / "al",
                                              skip_bad=True)] == ["7-1-0002"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ManifestError, match="no \\*.trans.txt"):
        prepare_librispeech(tmp_path / "nothing", tmp_path / "c")


def test_prepare_cpc_alignments(tmp_path):
    root = _librispeech(tmp_path / "L", speakers=("7",), chapters=("1",), per=1)
    (tmp_path / "cpc.txt").write_text("7-1-0000 " + " ".join(["0"] * 20 + ["2"] * 30) + "\n")
    from aviary.data.prepare import prepare_librispeech
    utts = prepare_librispeech(root, tmp_path / "c", cpc_alignments=tmp_path / "cpc.txt")
    assert utts[0].phones == [("sil", 0.0, pytest.approx(0.2)), ("AA", pytest.approx(0.2), pytest.approx(0.5))]


def test_prepare_folder_speaker_levels(tmp_path):
    rng = np.random.default_rng(0)
    for spk in ("alice", "bob"):
        for sess in ("s1", "s2"):
            d = tmp_path / "f" / spk / sess
            d.mkdir(parents=True)
            sf.write(d / "a.wav", rng.normal(0, 0.1, 4000).astype(np.float32), 8000)
            (d / "a.lab").write_text("some words")
    _textgrids(tmp_path / "f" / "alice" / "s1", [("a", 0.5)])
    assert main(["prepare", "folder", str(tmp_path / "f"), "--out", str(tmp_path / "c1")]) == 0
    utts = load_manifest(tmp_path / "c1")
    assert sorted(u.speaker for u in utts) == ["alice", "alice", "bob", "bob"]
    assert {u.id for u in utts} == {"alice-s1-a", "alice-s2-a", "bob-s1-a", "bob-s2-a"}
    assert all(u.text == "some words" and u.sample_rate == 8000 for u in utts)
    assert next(u for u in utts if u.id == "alice-s1-a").phones[1] == ("HH", 0.1, 0.3)
    from aviary.data.prepare import prepare_folder
    assert {u.speaker for u in prepare_folder(tmp_path / "f", tmp_path / "c2", speaker_level=-1)} == {"s1", "s2"}
    assert {u.speaker for u in prepare_folder(tmp_path / "f", tmp_path / "c3", speaker_level=0)} == {"f"}
    with pytest.raises(ManifestError, match="speaker level 3"):
        prepare_folder(tmp_path / "f", tmp_path / "c4", speaker_level=3)


def test_prepare_folder_skip_bad_decodes_what_it_keeps(tmp_path):
    # Headers alone pass a truncated, a NaN and a 10 ms file; with --skip-bad they must not
    # reach training, extraction or probes.
    import numpy as np
    import soundfile as sf

    from aviary.data.prepare import prepare_folder

    f = tmp_path / "f" / "s1"
    f.mkdir(parents=True)
    tone = (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    for i in range(3):
        sf.write(f / f"good{i}.wav", tone, 16000)
    sf.write(f / "short.wav", tone[:160], 16000)
    nan = tone.copy()
    nan[100] = np.nan
    sf.write(f / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(f / "trunc.wav", tone, 16000)
    (f / "trunc.wav").write_bytes((f / "trunc.wav").read_bytes()[:16000])
    utts = prepare_folder(tmp_path / "f", tmp_path / "c", skip_bad=True)
    assert sorted(u.id for u in utts) == ["s1-good0", "s1-good1", "s1-good2"]
    readme = (tmp_path / "c" / "README").read_text()
    assert "Skipped 3" in readme
    for name, kind in (("short.wav", "too_short"), ("nan.wav", "nonfinite"), ("trunc.wav", "truncated")):
        assert any(name in line and kind in line for line in readme.splitlines()), (name, readme)
