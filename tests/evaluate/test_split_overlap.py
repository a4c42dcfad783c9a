"""Splits that must be disjoint are checked against each other: a speaker in train-spk and
test-spk, or an utterance id in train and test, is refused by check-data, probe, extract
and the demo (before, every speaker-disjoint result was silently inflated)."""
import dataclasses
import shutil

import pytest

from aviary.cli import main
from aviary.data.manifest import ManifestError, check_disjoint_splits, read_manifest, write_manifest


def _leaky(corpus, root, kind):
    d = root / f"leaky-{kind}"
    shutil.copytree(corpus, d)
    if kind == "speaker":
        # A new utterance of a test-spk speaker in train-spk: ids stay unique, the voice leaks.
        test = read_manifest(d / "test-spk.jsonl")
        extra = dataclasses.replace(test[0], id=test[0].id + "-again")
        write_manifest(d / "train-spk.jsonl", read_manifest(d / "train-spk.jsonl") + [extra])
    else:
        # One test utterance also in train.
        test = read_manifest(d / "test.jsonl")
        write_manifest(d / "train.jsonl", read_manifest(d / "train.jsonl") + [test[0]])
    return d, test[0]


def test_check_disjoint_splits_names_splits_and_examples(kw_corpus, tmp_path):
    check_disjoint_splits(kw_corpus)  # the corpus as written is disjoint
    d, u = _leaky(kw_corpus, tmp_path, "speaker")
    with pytest.raises(ManifestError, match=rf"1 speaker\(s\) in both train-spk and test-spk.*'{u.speaker}'"):
        check_disjoint_splits(d)
    d, u = _leaky(kw_corpus, tmp_path, "id")
    with pytest.raises(ManifestError, match=rf"1 utterance id\(s\) in both train and test.*'{u.id}'"):
        check_disjoint_splits(d)


@pytest.mark.parametrize("kind", ["speaker", "id"])
def test_check_data_reports_overlaps_as_errors(kw_corpus, tmp_path, capsys, kind):
    assert main(["check-data", str(kw_corpus)]) == 0
    capsys.readouterr()
    d, _ = _leaky(kw_corpus, tmp_path, kind)
    assert main(["check-data", str(d)]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (splits)" in out
    assert ("speaker(s) in both train-spk and test-spk" if kind == "speaker"
            else "utterance id(s) in both train and test") in out


def test_probe_and_extract_refuse_overlapping_splits(kw_corpus, tmp_path, caplog):
    d, u = _leaky(kw_corpus, tmp_path, "speaker")
    rc = main(["probe", "--upstream", "logmel", "--data", str(d), "--task", "keyword", "--out",
               str(tmp_path / "p"), "--steps", "5"])
    assert rc == 2 and "speaker(s) in both train-spk and test-spk" in caplog.text
    assert not (tmp_path / "p" / "results.jsonl").exists()
    caplog.clear()
    d, u = _leaky(kw_corpus, tmp_path, "id")
    rc = main(["probe", "--upstream", "logmel", "--data", str(d), "--task", "speaker", "--out",
               str(tmp_path / "p2"), "--steps", "5"])
    assert rc == 2 and "utterance id(s) in both train and test" in caplog.text
    caplog.clear()
    rc = main(["extract", "--checkpoint", "logmel", "--data", str(d), "--out", str(tmp_path / "c")])
    assert rc == 2 and "utterance id(s) in both train and test" in caplog.text


def test_demo_refuses_overlapping_splits_before_pretraining(kw_corpus, tmp_path, monkeypatch):
    from aviary.analysis import demo

    d, _ = _leaky(kw_corpus, tmp_path, "speaker")
    monkeypatch.setattr(demo, "ensure_corpus", lambda cfg, out: d)
    monkeypatch.setattr(demo, "pretrain_models", lambda *a, **k: pytest.fail("pretrained on a leaky corpus"))
    with pytest.raises(ManifestError, match="speaker-disjoint"):
        demo.run_demo(tmp_path / "demo", quick=True)
