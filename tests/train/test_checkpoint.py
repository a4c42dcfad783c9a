"""aviary.train.checkpoint on its own: run-directory checkpoints round trip, damage is named by
file, a failed write leaves no partial directory, and the run-directory helpers (find_weights,
stored_run_config, write_imported_run)."""
import errno
import json
import os

import pytest
import torch

from aviary import storage
from aviary.models.registry import get_preset
from aviary.storage import CheckpointError
from aviary.train import checkpoint as ckpt


def _model():
    g = torch.Generator().manual_seed(0)
    return {"upstream.w": torch.randn(4, 3, generator=g), "head.b": torch.randn(3, generator=g)}


def _optimizer_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def _save(run, step, **kw):
    tensors, js = ckpt.optimizer_to_tensors(_optimizer_state())
    config = storage.checkpoint_config({"family": "x"}, {"steps": 10}, step)
    return ckpt.save_checkpoint(run, step, _model(), config, tensors, {"step": step, "optimizer": js}, **kw)


def test_round_trip(tmp_path):
    run = tmp_path / "run"
    d = _save(run, 3)
    assert d == ckpt.checkpoint_dir(run, 3) == run / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in d.iterdir()) == sorted([ckpt.MODEL_FILE, ckpt.TRAINER_FILE, ckpt.TRAINER_JSON])
    model, config, trainer, state = ckpt.load_checkpoint(d)
    assert all(torch.equal(model[k], v) for k, v in _model().items()) and set(model) == set(_model())
    assert config == {"model": {"family": "x"}, "train": {"steps": 10}, "step": 3,
                      "format_version": storage.FORMAT_VERSION}
    assert state["step"] == 3 and "checksum" not in state
    # The optimizer state comes back loadable and equal.
    again = ckpt.optimizer_from_tensors(trainer, state["optimizer"])
    ref = _optimizer_state()
    assert again["param_groups"] == json.loads(json.dumps(ref["param_groups"]))  # JSON: tuples as lists
    assert all(torch.equal(again["state"][0][k], v) for k, v in ref["state"][0].items() if torch.is_tensor(v))
    assert ckpt.stored_run_config(run) == (d / ckpt.MODEL_FILE, config)


def test_keep_last_prunes_old_checkpoints_and_leftover_temporaries(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        _save(run, step)
    (run / "checkpoints" / ".step-00000004.abc.tmp").mkdir()  # left by a killed write
    _save(run, 4, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("target", [ckpt.MODEL_FILE, ckpt.TRAINER_FILE, ckpt.TRAINER_JSON])
def test_a_checksum_failure_names_the_file(tmp_path, target):
    run = tmp_path / "run"
    d = _save(run, 1)
    path = d / target
    if target == ckpt.TRAINER_JSON:
        state = json.loads(path.read_text())
        state["step"] = 2  # an edit (or bit rot) the stored checksum does not match
        path.write_text(json.dumps(state))
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x10
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{d / target}: checksum mismatch"):
        ckpt.load_checkpoint(d)


def test_latest_good_checkpoint_falls_back_past_a_damaged_one(tmp_path, caplog):
    run = tmp_path / "run"
    assert ckpt.latest_good_checkpoint(run) is None
    _save(run, 1)
    d2 = _save(run, 2)
    (d2 / ckpt.MODEL_FILE).write_bytes(b"garbage")
    found, (_, config, _, _) = ckpt.latest_good_checkpoint(run)
    assert found == ckpt.checkpoint_dir(run, 1) and config["step"] == 1
    assert str(d2) in caplog.text
    (found / ckpt.TRAINER_JSON).unlink()
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints is usable"):
        ckpt.latest_good_checkpoint(run)


def test_a_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Atomicity: the disk fills up on the trainer file, after the model file was written."""
    run = tmp_path / "run"
    _save(run, 1)
    real = storage.save_tensors

    def full(path, tensors, **kw):
        if path.name == ckpt.TRAINER_FILE:
            raise CheckpointError(f"could not write {path} (disk full)") from OSError(errno.ENOSPC, "full")
        return real(path, tensors, **kw)

    monkeypatch.setattr(ckpt, "save_tensors", full)
    with pytest.raises(CheckpointError, match=r"step-00000002 \(disk full\).*earlier checkpoints are intact"):
        _save(run, 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert ckpt.load_checkpoint(ckpt.checkpoint_dir(run, 1))[1]["step"] == 1


def test_rewriting_a_step_replaces_the_whole_directory(tmp_path):
    run = tmp_path / "run"
    d = _save(run, 5)
    (d / "stray").write_text("from the damaged copy")
    assert _save(run, 5) == d and not (d / "stray").exists()
    assert ckpt.load_checkpoint(d)[3]["step"] == 5


def test_find_weights(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        ckpt.find_weights(run)
    run.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors and no checkpoints"):
        ckpt.find_weights(run)
    _save(run, 1)
    d2 = _save(run, 2)
    assert ckpt.find_weights(run) == d2 / ckpt.MODEL_FILE  # the newest checkpoint
    storage.save_tensors(run / ckpt.MODEL_FILE, _model())
    assert ckpt.find_weights(run) == run / ckpt.MODEL_FILE  # the root bundle first
    assert ckpt.find_weights(str(d2 / ckpt.MODEL_FILE)) == d2 / ckpt.MODEL_FILE


def test_stored_run_config_skips_unreadable_headers(tmp_path, caplog):
    run = tmp_path / "run"
    _save(run, 1)
    d2 = _save(run, 2)
    (d2 / ckpt.MODEL_FILE).write_bytes(b"\x00" * 4)
    path, config = ckpt.stored_run_config(run)
    assert path.parent.name == "step-00000001" and config["step"] == 1
    assert "unreadable header" in caplog.text


def test_write_imported_run(tmp_path):
    cfg = get_preset("mockingjay-tiny")
    out = tmp_path / "imported"
    source = {"toolkit": "s3prl", "path": "/x.ckpt"}
    weights = ckpt.write_imported_run(out, _model(), cfg, step=12, source=source, data="libri")
    assert weights == out / ckpt.MODEL_FILE
    _, meta = storage.load_tensors(weights)
    assert storage.load_config_from_metadata(weights, meta) == storage.checkpoint_config(cfg, None, 12, source=source)
    run_json = storage.read_json(out / ckpt.RUN_JSON)
    assert run_json == {"model": cfg.to_dict(), "train": None, "data": "libri", "source": source, "step": 12,
                        "format_version": storage.FORMAT_VERSION}
    with pytest.raises(FileExistsError, match="already holds an aviary model"):
        ckpt.write_imported_run(out, _model(), cfg, step=12, source=source)
    with pytest.raises(FileExistsError):
        ckpt.refuse_existing_model(out)
    ckpt.refuse_existing_model(tmp_path / "new")  # nothing there: fine
    assert not os.path.exists(tmp_path / "new")
