"""The pretraining loop on a tiny model: exact resume, signals, corruption, disk full, NaN."""
import errno
import json
import logging
import math
import os
import shutil
import re
import signal

import pytest
import torch

import tiny
from aviary.config import ConfigError
from aviary import storage
from aviary.train import checkpoint as ckpt
from aviary.train.config import TrainConfig
from aviary.train.loop import NonFiniteError, UnusableDataError, param_groups, pretrain

BASE = dict(steps=12, lr=3e-3, precision="fp32", log_every=2, val_every=6, checkpoint_every=4,
            keep_last=10, tensorboard=False)


def cfg(**kw):
    return TrainConfig(**{**BASE, **kw})


def run(out, resume=False, data=None, **kw):
    return pretrain(tiny.TinyConfig(), cfg(**kw), None, out, resume=resume,
                    train_data=data or tiny.SineData(), valid_data=tiny.SineData(6, seed=1))


def weights(path):
    return storage.load_tensors(path)[0]


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 12-step run that the resumed runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ref")
    res = run(out)
    return out, res


def _copy_until(src, dst, step):
    """A copy of a run directory as it was right after the checkpoint of ``step``."""
    dst.mkdir()
    shutil.copy(src / "run.json", dst / "run.json")
    for s, d in ckpt.list_checkpoints(src):
        if s <= step:
            shutil.copytree(d, dst / "checkpoints" / d.name)


def test_run_dir_layout_and_load(reference):
    out, res = reference
    assert res.step == 12 and res.nonfinite_steps == 0 and not res.interrupted
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [12, 8, 4]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["model"]["family"] == "tiny-test" and run_json["train"]["steps"] == 12
    state = json.loads((out / "checkpoints/step-00000008/trainer.json").read_text())
    assert state["step"] == 8 and {"epoch", "position", "g", "optimizer", "counters"} <= set(state)
    model, conf, trainer, _ = ckpt.load_checkpoint(out / "checkpoints/step-00000012")
    assert conf["step"] == 12 and conf["model"]["family"] == "tiny-test"
    assert any(k.startswith("optim.") for k in trainer)
    assert_bitwise(model, weights(out / "model.safetensors"))  # root bundle = newest
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r.get("split") != "valid"]
    valid = [r for r in lines if r.get("split") == "valid"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in valid] == [0, 6, 12]
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert train[-1]["loss"] < train[0]["loss"]
    up = __import__("aviary").load(str(out))  # the run dir is loadable as an upstream
    hs, lengths = up.extract(torch.randn(2, 1600), torch.tensor([1600, 800]))
    assert len(hs) == 2 and lengths.tolist() == [10, 5]


def test_resume_from_checkpoint_is_bitwise(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "resumed"
    _copy_until(ref, out, 4)
    res = run(out, resume=True)
    assert res.step == 12
    assert_bitwise(weights(out / "model.safetensors"), weights(ref / "model.safetensors"))
    # An intact bundle is left alone: resuming a finished run writes nothing.
    before = (out / "model.safetensors").stat().st_mtime_ns
    run(out, resume=True)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # The losses after the resume point are the same numbers as well.
    ref_lines = (ref / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in ref_lines if json.loads(x)["step"] > 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_kill_between_last_checkpoint_and_bundle_is_repaired_on_resume(reference, tmp_path):
    """Killed after writing the final checkpoint but before the root bundle: the bundle still
    holds an older step. ``--resume`` finds nothing left to train and must repair it."""
    ref, _ = reference
    out = tmp_path / "late-kill"
    shutil.copytree(ref, out)
    older = sorted((out / "checkpoints").glob("step-*"))[0]
    shutil.copy(older / "model.safetensors", out / "model.safetensors")
    assert not torch.equal(*[next(iter(weights(p).values())) for p in (out / "model.safetensors",
                                                                       ref / "model.safetensors")])
    res = run(out, resume=True)
    assert res.step == 12
    assert_bitwise(weights(out / "model.safetensors"), weights(ref / "model.safetensors"))


def test_resume_with_workers_is_bitwise(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "workers"
    _copy_until(ref, out, 8)
    run(out, resume=True, num_workers=2)  # crops are decided before items reach a worker
    assert_bitwise(weights(out / "model.safetensors"), weights(ref / "model.safetensors"))


class SigtermAt(tiny.SineData):
    """Sends SIGTERM to this process when item number ``at`` is loaded."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def load_item(self, index, seed):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().load_item(index, seed)


def test_sigterm_checkpoints_and_exits_cleanly(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "term"
    res = run(out, data=SigtermAt(at=12))
    assert res.interrupted and 0 < res.step < 12
    assert ckpt.list_checkpoints(out)[0][0] == res.step  # a checkpoint of the step it stopped at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    res2 = run(out, resume=True)
    assert res2.step == 12 and not res2.interrupted
    assert_bitwise(weights(out / "model.safetensors"), weights(ref / "model.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "trainer_json"])
def test_damaged_newest_checkpoint_falls_back(reference, tmp_path, caplog, damage):
    ref, _ = reference
    out = tmp_path / damage
    _copy_until(ref, out, 8)
    newest = out / "checkpoints/step-00000008"
    if damage == "truncate":
        p = newest / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "bitflip":
        p = newest / "trainer.safetensors"
        b = bytearray(p.read_bytes())
        b[-5] ^= 0x10
        p.write_bytes(bytes(b))
    else:
        p = newest / "trainer.json"
        p.write_text(p.read_text().replace('"step": 8', '"step": 9'))
    with caplog.at_level(logging.WARNING):
        found = ckpt.latest_good_checkpoint(out)
    assert found[0].name == "step-00000004"
    assert "step-00000008" in caplog.text and "falling back" in caplog.text
    res = run(out, resume=True)
    assert res.step == 12
    assert_bitwise(weights(out / "model.safetensors"), weights(ref / "model.safetensors"))


def test_no_usable_checkpoint_is_an_error(tmp_path):
    d = tmp_path / "checkpoints/step-00000004"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(storage.CheckpointError, match="none of the 1 checkpoints is usable"):
        ckpt.latest_good_checkpoint(tmp_path)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "full"
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, _b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        name = os.readlink(f"/proc/self/fd/{fd}")
        # The second checkpoint fails half-way: after its model file, on the trainer file.
        if ".trainer.safetensors." in name and ckpt.list_checkpoints(out):
            return Full(f)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(storage.CheckpointError, match="disk full") as e:
        run(out)
    assert "step-00000008" in str(e.value) and "earlier checkpoints are intact" in str(e.value)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4]
    ckpt.load_checkpoint(out / "checkpoints/step-00000004")  # intact, verifies
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    monkeypatch.undo()
    assert run(out, resume=True).step == 12


def test_nan_inputs_skip_steps_then_stop(tmp_path):
    # Every item NaN: every step is skipped, the run stops after 3 in a row, weights untouched.
    data = tiny.SineData(nan_items=set(range(24)))
    with pytest.raises(NonFiniteError, match=r"3 steps in a row.*max_nonfinite_steps=3"):
        run(tmp_path / "allnan", data=data, max_nonfinite_steps=3)
    # Some NaN items: those steps are skipped and counted, the run completes with finite weights.
    res = run(tmp_path / "somenan", data=tiny.SineData(nan_items={0, 5}), steps=8, max_nonfinite_steps=8)
    assert res.step == 8 and 0 < res.nonfinite_steps < 8
    final = weights(tmp_path / "somenan/model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    rec = [json.loads(x) for x in (tmp_path / "somenan/metrics.jsonl").read_text().splitlines()]
    assert [r for r in rec if r.get("split") != "valid"][-1]["nonfinite_steps"] == res.nonfinite_steps


def test_skipped_step_does_not_touch_the_weights(tmp_path):
    out = tmp_path / "skip"
    # Every step skipped: the run must not end "successfully" with these weights (below), but
    # its intermediate checkpoint shows them untouched.
    with pytest.raises(NonFiniteError, match="last 3 steps had a non-finite loss"):
        run(out, data=tiny.SineData(nan_items=set(range(24))), steps=3, max_nonfinite_steps=5,
            checkpoint_every=2)
    torch.manual_seed(0)
    init = tiny.TinyPretrain(tiny.TinyConfig()).state_dict()
    assert_bitwise(weights(out / "checkpoints/step-00000002/model.safetensors"), init)
    # No root bundle is written while the run is in a streak of skipped steps.
    assert not (out / "model.safetensors").exists()


def test_huge_learning_rate_stops_with_clear_error(tmp_path):
    with pytest.raises(NonFiniteError, match="Lower train.lr"):
        run(tmp_path / "lr", lr=1e30, steps=40, max_nonfinite_steps=2, warmup_fraction=0.0)


def test_existing_run_needs_resume(reference):
    out, _ = reference
    with pytest.raises(ConfigError, match="pass --resume"):
        run(out)


def test_resume_with_other_model_config_is_refused(reference, tmp_path):
    out = tmp_path / "other"
    _copy_until(reference[0], out, 4)
    with pytest.raises(ConfigError, match=r"different model config \(keys \['hidden'\]\)"):
        pretrain(tiny.TinyConfig(hidden=8), cfg(), None, out, resume=True, train_data=tiny.SineData())


def test_weight_decay_groups():
    m = tiny.TinyPretrain(tiny.TinyConfig())
    decay, no_decay = param_groups(m, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    # biases and LayerNorm weight/bias are all in the no-decay group
    assert len(no_decay["params"]) == 5 and len(decay["params"]) == 3


def test_bf16_autocast_runs(tmp_path):
    res = run(tmp_path / "bf16", precision="bf16", steps=4, val_every=0)
    assert res.step == 4 and res.nonfinite_steps == 0


def test_broken_audio_files_are_skipped_and_counted(sine_corpus, tmp_path, caplog):
    from aviary.data.manifest import load_manifest
    from aviary.train.recipe import resolve_configs

    corpus = tmp_path / "corpus"
    shutil.copytree(sine_corpus, corpus)
    train = load_manifest(corpus, "train")
    (corpus / os.path.basename(train[0].audio)).write_bytes(b"RIFF\x00\x00not a wav")  # corrupt
    (corpus / os.path.basename(train[1].audio)).write_bytes(b"")                        # empty
    m, t = resolve_configs("mockingjay-tiny", overrides=[
        "steps=6", "precision=fp32", "max_batch_seconds=3", "crop_seconds=1", "val_every=0",
        "tensorboard=false", "log_every=6"])
    with caplog.at_level(logging.WARNING):
        res = pretrain(m, t, corpus, tmp_path / "run")
    assert res.step == 6 and res.nonfinite_steps == 0
    rec = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert rec["skipped_items"] >= 1 and math.isfinite(rec["loss"])
    assert train[0].id in caplog.text or train[1].id in caplog.text


class _Unusable(tiny.SineData):
    """SineData whose items in ``bad`` fail to load (``None``), as broken files do."""

    def __init__(self, bad, **kw):
        super().__init__(**kw)
        self.bad = set(bad)

    def load_item(self, index, seed):
        return None if index in self.bad else super().load_item(index, seed)

    def item_name(self, index):
        return f"file-{index}.wav"


def test_diverged_run_exits_nonzero_and_writes_no_bundle(tmp_path):
    # lr 1e30: the first update makes the weights huge (finite), every later step is skipped.
    # The run ends within max_nonfinite_steps of the blow-up: it must not end as a success.
    out = tmp_path / "lr"
    with pytest.raises(NonFiniteError, match=r"diverged: its last \d+ steps had a non-finite"):
        run(out, lr=1e30, steps=6, max_nonfinite_steps=20, warmup_fraction=0.0, checkpoint_every=4)
    assert not (out / "model.safetensors").exists()
    # --resume of that run (from its step-4 checkpoint) diverges again, and writes no bundle either.
    with pytest.raises(NonFiniteError, match="diverged"):
        run(out, resume=True, lr=1e30, steps=6, max_nonfinite_steps=20, warmup_fraction=0.0,
            checkpoint_every=4)
    assert not (out / "model.safetensors").exists()


def test_nonfinite_final_validation_loss_fails_the_run(tmp_path):
    with pytest.raises(NonFiniteError, match="final validation loss is nan"):
        pretrain(tiny.TinyConfig(), cfg(steps=4, val_every=0), None, tmp_path / "v",
                 train_data=tiny.SineData(), valid_data=tiny.SineData(6, seed=1, nan_items={0, 1, 2, 3, 4, 5}))


def test_nonfinite_weights_are_never_written(tmp_path):
    from aviary.train.loop import _save

    model = tiny.TinyPretrain(tiny.TinyConfig())
    with torch.no_grad():
        model.objective.head.weight[0, 0] = float("nan")
    opt = torch.optim.AdamW(model.parameters())
    from aviary.train.data import StreamPosition
    from aviary.train.distributed import DistInfo
    with pytest.raises(NonFiniteError, match=r"non-finite \(first: head.weight\); nothing written"):
        _save(tmp_path, 3, model, opt, None, tiny.TinyConfig(), cfg(), StreamPosition(),
              {"nonfinite_in_a_row": 0}, DistInfo())
    assert not (tmp_path / "model.safetensors").exists() and not ckpt.list_checkpoints(tmp_path)


@pytest.mark.parametrize("bad", [set(range(24)), set(range(20))])
def test_mostly_unusable_training_data_stops_the_run(tmp_path, bad):
    # All (or 20 of 24) files unusable: before, the run did all its steps on nothing (loss 0.0)
    # and exited 0 with an untrained model.
    with pytest.raises(UnusableDataError, match=r"only \d+ of the \d+ training files read so far were "
                                                r"usable .*first unusable: file-\d+\.wav"):
        run(tmp_path / "r", data=_Unusable(bad), steps=50, checkpoint_every=100)
    assert not (tmp_path / "r/model.safetensors").exists()
    # A few broken files are skipped and counted as before.
    res = run(tmp_path / "ok", data=_Unusable({0, 7}), steps=6)
    assert res.step == 6 and math.isfinite(res.train_loss)


def test_unusable_validation_data_stops_the_run(tmp_path):
    with pytest.raises(UnusableDataError, match=r"validation at step 0: only 0 of the 6 valid files"):
        pretrain(tiny.TinyConfig(), cfg(steps=4), None, tmp_path / "v", train_data=tiny.SineData(),
                 valid_data=_Unusable(range(6), n=6, seed=1))


def test_step0_validation_line_is_not_repeated_after_a_kill_before_the_first_checkpoint(reference, tmp_path):
    # A run killed before its first checkpoint left its step-0 validation line; the new start
    # (from step 0) writes it again, once.
    out = tmp_path / "early"
    out.mkdir()
    shutil.copy(reference[0] / "run.json", out / "run.json")
    lines = (reference[0] / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run(out, resume=True)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("split")) for r in rec] == [
        (r["step"], r.get("split")) for r in map(json.loads, lines)]


def test_stale_manifest_durations_stop_pretrain_and_fail_check_data(sine_corpus, tmp_path, caplog, capsys):
    # Durations 20x too long (a manifest left from before the audio was re-cut): crops fall past
    # the end of most files. Before: "train_loss" 0.0, an untrained model, exit 0; check-data
    # called it a warning "handled by the loader".
    from aviary.cli import main as cli_main
    from aviary.data.manifest import read_manifest, write_manifest

    corpus = tmp_path / "corpus"
    shutil.copytree(sine_corpus, corpus)
    for split in ("manifest", "train", "valid"):
        utts = read_manifest(corpus / f"{split}.jsonl")
        write_manifest(corpus / f"{split}.jsonl", [u.__class__(**{**u.to_dict(), "audio": u.audio,
                                                                   "duration": 20 * u.duration}) for u in utts])
    assert cli_main(["check-data", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (file unusable)" in out and "duration_mismatch" in out.split("WARNINGS")[0]
    rc = cli_main(["pretrain", "--model", "mockingjay-tiny", "--data", str(corpus), "--out",
                   str(tmp_path / "run"), "--steps", "5", "train.precision=fp32", "train.crop_seconds=1",
                   "train.max_batch_seconds=4", "train.tensorboard=false"])
    assert rc == 2
    assert re.search(r"only \d+ of the \d+ (training|valid) files read so far were usable", caplog.text)
    assert "u0" in caplog.text and "check-data" in caplog.text
    assert not (tmp_path / "run/model.safetensors").exists()


def _cli_pretrain(*args):
    from aviary.cli import main as cli_main

    return cli_main(["pretrain", *args, "train.precision=fp32", "train.tensorboard=false",
                     "train.checkpoint_every=2", "train.log_every=2", "train.crop_seconds=1",
                     "train.max_batch_seconds=4"])


def test_resume_mistakes_are_refused_without_damaging_the_run(sine_corpus, tmp_path, caplog):
    out = tmp_path / "run"
    assert _cli_pretrain("--model", "tiny-test", "--data", str(sine_corpus), "--out", str(out), "--steps", "2") == 0
    (out / "run.json").unlink()
    caplog.clear()
    # A wrong --model after run.json was lost: refused naming the checkpoint, run.json not rewritten.
    assert _cli_pretrain("--model", "tiny-test-nodrop", "--data", str(sine_corpus), "--out", str(out),
                         "--steps", "4", "--resume") == 2
    assert "different model config than this checkpoint's (keys ['dropout']" in caplog.text
    assert "step-00000002/model.safetensors" in caplog.text and not (out / "run.json").exists()
    # Without run.json and without --data: the missing file is named (not "no model given").
    caplog.clear()
    assert _cli_pretrain("--out", str(out), "--resume", "--steps", "4") == 2
    assert f"{out / 'run.json'}: not found, so the run's corpus is unknown" in caplog.text
    # The right command still works (settings from the checkpoint's header).
    assert _cli_pretrain("--model", "tiny-test", "--data", str(sine_corpus), "--out", str(out),
                         "--steps", "4", "--resume") == 0
    assert json.loads((out / "run.json").read_text())["model"]["dropout"] == 0.1
    # Another corpus on --resume: refused (was a warning about `steps` at most). A copy with
    # one utterance fewer in train is another corpus, although it lies in the same kind of place.
    other = tmp_path / "other"
    shutil.copytree(sine_corpus, other)
    train_lines = (other / "train.jsonl").read_text().splitlines(keepends=True)
    (other / "train.jsonl").write_text("".join(train_lines[:-1]))
    caplog.clear()
    assert _cli_pretrain("--data", str(other), "--out", str(out), "--steps", "6", "--resume") == 2
    assert "the run was trained on" in caplog.text and str(other) in caplog.text
    # Nothing to resume at all: named.
    caplog.clear()
    assert _cli_pretrain("--out", str(tmp_path / "empty"), "--resume") == 2
    assert "run.json: not found and" in caplog.text and "nothing to resume" in caplog.text
    # --out naming a file.
    (tmp_path / "afile").write_text("x")
    caplog.clear()
    assert _cli_pretrain("--model", "tiny-test", "--data", str(sine_corpus), "--out", str(tmp_path / "afile")) == 2
    assert "afile: is a file, not a run directory" in caplog.text and "Errno" not in caplog.text


def test_a_moved_run_resumes_on_its_moved_corpus(sine_corpus, tmp_path, caplog):
    # run.json keeps the corpus path as it was given; after the run and its corpus move (a demo
    # directory renamed), the same manifest at the new path is the same corpus: the run resumes.
    home = tmp_path / "a"
    shutil.copytree(sine_corpus, home / "corpus")
    assert _cli_pretrain("--model", "tiny-test", "--data", str(home / "corpus"), "--out", str(home / "run"),
                         "--steps", "2") == 0
    stored = json.loads((home / "run" / "run.json").read_text())
    assert stored["data"] == str(home / "corpus") and len(stored["data_sha256"]) == 64
    moved = tmp_path / "b"
    home.rename(moved)
    caplog.clear()
    assert _cli_pretrain("--model", "tiny-test", "--data", str(moved / "corpus"), "--out", str(moved / "run"),
                         "--steps", "4", "--resume") == 0, caplog.text
    assert json.loads((moved / "run" / "run.json").read_text())["train"]["steps"] == 4
