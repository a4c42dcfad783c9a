"""The pretraining loop, cut into named steps, trains exactly as the single ``_train`` did.

``tests/data_files/loop-runs.expected.json`` was written by the single 172-line ``_train``
(commit cc7f6e3) with ``AVIARY_WRITE_EXPECTED=1 pytest tests/train/test_loop_steps.py``:
for each case the final weights' checksum, every metrics line (throughput left out: it is
time), the checkpoint steps and the result's counters. Never regenerate it to make this test
pass. On the machine and torch version that wrote it everything is compared exactly;
elsewhere the losses to 1e-5 and the weights not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import tiny
from aviary.train import checkpoint as ckpt
from aviary.train.config import TrainConfig
from aviary.train.loop import pretrain
from expectations import close, machine

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "loop-runs.expected.json"


class _SomeUnusable(tiny.SineData):
    """SineData whose items 3 and 11 fail to load, as broken files do."""

    def load_item(self, index, seed):
        return None if index in (3, 11) else super().load_item(index, seed)


def _cases():
    base = dict(lr=3e-3, precision="fp32", keep_last=10, tensorboard=False)
    return {
        # grad accumulation, logging / validation / checkpoint intervals that do not divide the run
        "accum": (TrainConfig(**base, steps=10, grad_accum=2, log_every=3, val_every=4, checkpoint_every=5),
                  tiny.SineData(), tiny.SineData(6, seed=1)),
        # NaN items: skipped steps, counters, the root bundle held back
        "nonfinite": (TrainConfig(**base, steps=8, log_every=2, val_every=0, checkpoint_every=3,
                                  max_nonfinite_steps=8), tiny.SineData(nan_items={0, 5}), None),
        # unusable files dropped and counted; warmup, clipping and a floor on the schedule
        "dropped": (TrainConfig(**{**base, "lr": 1e-2}, steps=7, warmup_fraction=0.4, grad_clip=0.5, min_lr_ratio=0.1,
                                log_every=1, val_every=3, checkpoint_every=100), _SomeUnusable(),
                    tiny.SineData(6, seed=1)),
    }



def _checksum(tensors) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _outcome(name, tmp_path):
    train_cfg, train_data, valid_data = _cases()[name]
    out = tmp_path / name
    res = pretrain(tiny.TinyConfig(), train_cfg, None, out, train_data=train_data, valid_data=valid_data)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        rec.pop("throughput", None)
    bundle = out / ckpt.MODEL_FILE
    return {"weights": _checksum(res.model.state_dict()),
            "bundle": _checksum(ckpt.load_tensors(bundle)[0]) if bundle.exists() else None,
            "metrics": lines, "checkpoints": sorted(s for s, _ in ckpt.list_checkpoints(out)),
            "step": res.step, "train_loss": res.train_loss, "valid_loss": res.valid_loss,
            "nonfinite_steps": res.nonfinite_steps, "history": len(res.history)}



@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop-steps")
    got = {name: json.loads(json.dumps(_outcome(name, tmp))) for name in _cases()}
    if os.environ.get("AVIARY_WRITE_EXPECTED") == "1":
        EXPECTED.write_text(json.dumps({"machine": machine(), "runs": got}, indent=1, sort_keys=True) + "\n")
    return got


@pytest.mark.parametrize("name", list(_cases()))
def test_run_is_unchanged(outcomes, name):
    expected = json.loads(EXPECTED.read_text())
    ref, got = expected["runs"][name], outcomes[name]
    if expected["machine"] == machine():
        assert got == ref
    else:
        for k in ("weights", "bundle"):
            ref.pop(k), got.pop(k)
        assert close(got, ref, 1e-5)
