"""DistributedDataParallel: 2 CPU processes (gloo) under torchrun vs one process.

Exactly comparable set-up: W=2 ranks with 1 micro-batch each consume, per step, the same two
micro-batches (same crops, same masks and dropout: all drawn from (seed, global index)) as one
process with grad_accum=2, and DDP's mean over ranks equals the mean over micro-batches.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from aviary import storage
from aviary.train import checkpoint as ckpt
from aviary.train.config import TrainConfig
from aviary.train.loop import pretrain

HERE = Path(__file__).parent
ARGS = dict(steps=6, lr=3e-3, precision="fp32", log_every=1, val_every=0, checkpoint_every=3,
            tensorboard=False, device="cpu")


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_single_process(tmp_path):
    # This tree's aviary, not whichever one the venv has installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", str(HERE / "ddp_worker.py"), str(tmp_path / "ddp"),
           *[f"{k}={v}" for k, v in ARGS.items()], "grad_accum=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0 = storage.load_tensors(tmp_path / "ddp/rank0.safetensors")[0]
    w1 = storage.load_tensors(tmp_path / "ddp/rank1.safetensors")[0]
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # both ranks end with identical weights

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = pretrain(tiny.TinyConfig(), TrainConfig(**ARGS, grad_accum=2), None,
                          tmp_path / "single", train_data=tiny.SineData())
    finally:
        torch.set_num_threads(threads)
    ws = single.model.state_dict()
    for k in ws:
        # Bitwise, not just close: the two sums differ only by exact power-of-two scalings
        # ((g0 + g1) / 2 across ranks vs g0 / 2 + g1 / 2 accumulated), and 2 terms add
        # commutatively.
        assert torch.equal(w0[k], ws[k]), (k, float((w0[k] - ws[k]).abs().max()))
    assert _losses(tmp_path / "ddp/run") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    # Only rank 0 wrote the run directory (one metrics line per step, one set of checkpoints).
    assert len(_losses(tmp_path / "ddp/run")) == ARGS["steps"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ddp/run")] == [6, 3]
