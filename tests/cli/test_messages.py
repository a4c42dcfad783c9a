"""Errors a new user meets name the file and the problem: no raw errno, no traceback, no
stack of the library's internals (issue 16, "clear to the code, unclear to the user")."""
import errno
import io
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import aviary
from aviary.cli import main
from aviary.config import ConfigError
from aviary.data.manifest import Utterance, write_corpus
from aviary.hub import save_bundle
from aviary.models.registry import build_pretrain, get_preset
from aviary.storage import save_tensors


@pytest.fixture()
def bundle(tmp_path):
    cfg = get_preset("mockingjay-tiny")
    torch.manual_seed(0)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    save_bundle(path, build_pretrain(cfg).state_dict(), cfg, step=1)
    return path


@pytest.fixture()
def small_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    utts = []
    for i in range(10):
        p = root / f"u{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        utts.append(Utterance(id=f"u{i}", audio=str(p), duration=0.5, sample_rate=16000, speaker=f"s{i % 2}"))
    write_corpus(root, utts, readme="test")
    return root


def test_broken_pipe_is_quiet(bundle, monkeypatch, caplog):
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    monkeypatch.setattr("aviary.cli._silence_stdout", lambda: None)  # keep pytest's own stdout
    assert main(["info", str(bundle.parent)]) == 141
    assert "Broken pipe" not in caplog.text and "Errno" not in caplog.text


def test_a_pickle_named_model_safetensors_is_named_not_a_traceback(tmp_path, caplog):
    import pickle

    d = tmp_path / "run"
    d.mkdir()
    (d / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    assert main(["info", str(d)]) == 2
    assert "model.safetensors: a torch.save / pickle file" in caplog.text and "not loaded" in caplog.text


def test_a_bad_config_in_the_header_names_the_file(tmp_path):
    cfg = get_preset("mockingjay-tiny").to_dict()
    cfg["encoder"]["num_layers"] = -1
    path = tmp_path / "bad.safetensors"
    save_tensors(path, {"x": torch.zeros(1)}, config={"model": cfg})
    with pytest.raises(ConfigError, match=r"bad.safetensors: the model config stored in the file is invalid.*num_layers"):
        aviary.load(path)
    assert main(["info", str(path)]) == 2


def test_out_naming_a_file_and_empty_manifests(small_corpus, tmp_path, caplog):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for verb in (["extract", "--checkpoint", "logmel", "--data", str(small_corpus), "--out", str(afile)],
                 ["probe", "--upstream", "logmel", "--task", "speaker", "--data", str(small_corpus),
                  "--out", str(afile)]):
        caplog.clear()
        assert main(verb) == 2
        assert f"{afile}: exists and is not a directory" in caplog.text and "Errno" not in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    caplog.clear()
    assert main(["extract", "--checkpoint", "logmel", "--data", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert f"{empty}: no utterances to extract" in caplog.text


def test_disk_full_in_extract_names_the_shard_and_leaves_no_tmp(small_corpus, tmp_path, monkeypatch, caplog):
    from aviary.evaluate import cache as cache_mod

    def full(f, arr):
        f.write(b"x" * 100)
        raise OSError("15296 requested and 10208 written")

    monkeypatch.setattr(cache_mod.np, "save", full)
    out = tmp_path / "cache"
    assert main(["extract", "--checkpoint", "logmel", "--data", str(small_corpus), "--out", str(out)]) == 2
    assert "shard-00000: could not write the shard (disk full)" in caplog.text
    assert "run the same `aviary extract` again" in caplog.text
    assert not list(out.glob("*.tmp"))


def test_disk_full_in_probe_names_the_results_file(small_corpus, tmp_path, monkeypatch, caplog):
    from aviary.evaluate import results as results_mod

    real_write = results_mod.os.write

    def full(fd, data):
        if b'"task"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(results_mod.os, "write", full)
    out = tmp_path / "p"
    assert main(["probe", "--upstream", "fbank", "--task", "speaker", "--data", str(small_corpus),
                 "--out", str(out), "--steps", "5"]) == 2
    assert f"{out / 'results.jsonl'}: no space left on device (disk full)" in caplog.text
