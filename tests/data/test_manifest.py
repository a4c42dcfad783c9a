"""Manifests: round trip, validation errors naming file:line, corpus dirs, splits."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from aviary.data.manifest import (ALL_SPLITS, ManifestError, Utterance, load_manifest, make_splits,
                                  read_manifest, write_corpus, write_manifest)


def _utts(n_spk=10, per=10):
    return [Utterance(id=f"s{s}-{i}", audio=f"/x/s{s}-{i}.flac", duration=1.0 + i / 10, sample_rate=16000,
                      speaker=f"s{s}", text="HI", phones=[("sil", 0.0, 0.5), ("AA", 0.5, 1.0)])
            for s in range(n_spk) for i in range(per)]


def test_roundtrip_and_relative_paths(tmp_path):
    (tmp_path / "a").mkdir()
    u = Utterance(id="u1", audio=str(tmp_path / "a" / "u1.flac"), duration=1.5, sample_rate=16000,
                  speaker="7", phones=[("sil", 0.0, 0.2), ("HH", 0.2, 1.5)], keyword="yes")
    write_manifest(tmp_path / "m.jsonl", [u])
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["audio"] == "a/u1.flac"
    assert read_manifest(tmp_path / "m.jsonl") == [u]


@pytest.mark.parametrize("line,msg", [
    ("{not json", "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000}', "missing key"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000, "speaker": "s", "speeker": 1}', "unknown key"),
    ('{"id": "a", "audio": "a.wav", "duration": -1, "sample_rate": 16000, "speaker": "s"}', "duration"),
    ('{"id": "a", "audio": "a.wav", "duration": "1", "sample_rate": 16000, "speaker": "s"}', "duration"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 0, "speaker": "s"}', "sample_rate"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000, "speaker": "s", "phones": [["QQ", 0, 1]]}', "QQ"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000, "speaker": "s", "phones": [["AA", 0, 3]]}', "do not match"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000, "speaker": "s", "phones": [["AA", 0.5, 0.2]]}', "bad time range"),
    ('{"id": "a", "audio": "a.wav", "duration": 1, "sample_rate": 16000, "speaker": "s", "phones": [["AA", 0]]}', "not \\[symbol"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, msg):
    good = '{"id": "g", "audio": "g.wav", "duration": 1, "sample_rate": 16000, "speaker": "s"}'
    p = tmp_path / "bad.jsonl"
    p.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ManifestError, match=f"bad.jsonl:3: .*{msg}"):
        read_manifest(p)


def test_duplicates_and_missing_files(tmp_path):
    good = '{"id": "g", "audio": "g.wav", "duration": 1, "sample_rate": 16000, "speaker": "s"}'
    p = tmp_path / "m.jsonl"
    p.write_text(good + "\n" + good + "\n")
    with pytest.raises(ManifestError, match="m.jsonl:2: duplicate id 'g'"):
        read_manifest(p)
    p.write_text(good + "\n")
    assert len(read_manifest(p)) == 1
    with pytest.raises(ManifestError, match="m.jsonl:1: audio file of 'g' not found"):
        read_manifest(p, check_files=True)
    with pytest.raises(ManifestError, match="nope.jsonl: no such manifest"):
        load_manifest(tmp_path / "nope.jsonl")


def test_splits_8_1_1_and_speaker_disjoint():
    utts = _utts(20, 10)
    a, b = make_splits(utts, seed=3), make_splits(utts, seed=3)
    assert a == b and make_splits(utts, seed=4) != a
    ids = lambda part: {u.id for u in part}
    for names in (("train", "valid", "test"), ("train-spk", "valid-spk", "test-spk")):
        parts = [ids(a[n]) for n in names]
        assert sum(map(len, parts)) == len(utts) and len(set.union(*parts)) == len(utts)
    assert [len(a[n]) for n in ("train", "valid", "test")] == [160, 20, 20]
    assert {u.speaker for u in a["valid"]} == {u.speaker for u in utts}  # every speaker everywhere
    spk = [{u.speaker for u in a[n]} for n in ("train-spk", "valid-spk", "test-spk")]
    assert [len(s) for s in spk] == [16, 2, 2] and not (spk[0] & spk[1] or spk[0] & spk[2] or spk[1] & spk[2])


def test_corpus_dir(tmp_path):
    utts = _utts(5, 10)
    counts = write_corpus(tmp_path / "c", utts, readme="made by a test", seed=0)
    assert counts["manifest"] == 50 and counts["train"] == 40
    assert (tmp_path / "c" / "README").read_text().startswith("made by a test")
    assert len(load_manifest(tmp_path / "c")) == 50
    for s in ALL_SPLITS:
        assert load_manifest(tmp_path / "c", s) == load_manifest(tmp_path / "c" / "manifest.jsonl", s)
    with pytest.raises(ManifestError, match="split 'dev'"):
        load_manifest(tmp_path / "c", "dev")
    with pytest.raises(ManifestError, match="no split"):
        load_manifest(tmp_path / "c" / "train.jsonl", "valid")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_lines_give_documented_errors_only(tmp_path_factory, line):
    p = tmp_path_factory.mktemp("h") / "m.jsonl"
    p.write_text(line + "\n", encoding="utf-8")
    try:
        utts = read_manifest(p)
    except ManifestError as e:
        assert "m.jsonl" in str(e)
    else:
        assert all(isinstance(u, Utterance) for u in utts)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: json_values for k in
       ("id", "audio", "duration", "sample_rate", "speaker", "text", "phones", "keyword")}))
def test_arbitrary_records_give_documented_errors_only(tmp_path_factory, rec):
    p = tmp_path_factory.mktemp("h") / "m.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    try:
        read_manifest(p)
    except ManifestError as e:
        assert "m.jsonl:1" in str(e)
