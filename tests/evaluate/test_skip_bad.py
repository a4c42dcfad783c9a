"""`aviary extract` and `aviary probe` with --skip-bad: one unusable clip no longer stops them,
and what was left out is counted in the cache index and in every probe record."""
import json
import shutil

import numpy as np
import soundfile as sf

from aviary.cli import main
from aviary.data.manifest import read_manifest
from aviary.evaluate.results import load_records




def test_extract_and_probe_skip_bad(corpus, tmp_path, caplog, capsys):
    d = tmp_path / "corpus"
    shutil.copytree(corpus, d)
    u = read_manifest(d / "train.jsonl")[0]
    # The copy's audio lies in the copy: make this file a 10 ms clip.
    assert str(u.audio).startswith(str(d))
    sf.write(u.audio, np.zeros(160, np.float32), 16000)
    # Without --skip-bad: stops, naming the file and the way out.
    assert main(["extract", "--checkpoint", "logmel", "--data", str(d), "--out", str(tmp_path / "c0")]) == 2
    assert u.audio in caplog.text and "--skip-bad" in caplog.text
    capsys.readouterr()
    assert main(["extract", "--checkpoint", "logmel", "--data", str(d), "--out", str(tmp_path / "c"),
                 "--skip-bad"]) == 0
    assert "1 unusable files skipped" in capsys.readouterr().out
    idx = json.loads((tmp_path / "c" / "index.json").read_text())
    assert [x[0] for x in idx["skipped_files"]] == [u.id] and u.audio in idx["skipped_files"][0][1]
    assert u.id not in {i for s in idx["shards"] for i in s["ids"]}
    out = tmp_path / "p"
    assert main(["probe", "--upstream", "fbank", "--data", str(d), "--task", "speaker", "--out", str(out),
                 "--steps", "5"]) == 2
    assert main(["probe", "--upstream", "fbank", "--data", str(d), "--task", "speaker", "--out", str(out),
                 "--steps", "5", "--skip-bad"]) == 0
    (rec,) = load_records(out)
    assert rec["skipped_files"] == {"train": 1, "valid": 0, "test": 0}
