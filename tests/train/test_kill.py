"""Kill `aviary pretrain` with SIGKILL at random points, resume, and get the same weights.

The reference is an uninterrupted run of the same command in a fresh process; the
interrupted one is killed three times at random moments (after it has made some progress: mid-step, mid-validation or mid-checkpoint-write) and
resumed with ``--resume`` each time. Final weights must be bitwise equal.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from aviary import storage
from aviary.train import checkpoint as ckpt

OVERRIDES = ["train.checkpoint_every=2", "train.precision=fp32", "train.log_every=1",
             "train.val_every=6", "train.max_batch_seconds=3", "train.crop_seconds=1",
             "train.tensorboard=false", "train.keep_last=2"]
STEPS = 12


def _launch(corpus, out, log):
    cmd = [sys.executable, "-m", "aviary", "pretrain", "--model", "mockingjay-tiny", "--data",
           str(corpus), "--out", str(out), "--steps", str(STEPS), "--resume", *OVERRIDES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _last_step(out):
    """The newest training step in metrics.jsonl (0 before the first; torn lines ignored)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") != "valid":
            return int(rec["step"])
    return 0


def test_sigkill_and_resume_is_bitwise(sine_corpus, tmp_path):
    # The reference is the same command run uninterrupted in a fresh process. (In the test
    # process itself, after other tests have run, CPU kernels may pick other code paths for
    # differently aligned buffers and differ in the last bits, which is not what is tested.)
    with open(tmp_path / "ref-stderr.txt", "wb") as log:
        assert _launch(sine_corpus, tmp_path / "ref", log).wait(timeout=300) == 0, \
            (tmp_path / "ref-stderr.txt").read_text()[-3000:]
    ref = storage.load_tensors(tmp_path / "ref/model.safetensors")[0]

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    with open(tmp_path / "stderr.txt", "wb") as log:
        # Kill once the run has logged a randomly chosen step, a random fraction of a step
        # later (mid-step, mid-validation or mid-checkpoint-write). Progress-based rather than
        # time-based, so that it kills on an idle machine (fast steps) and a loaded one alike.
        for target in sorted(rng.sample(range(2, STEPS), 3)):
            p = _launch(sine_corpus, out, log)
            deadline = time.monotonic() + 180
            while p.poll() is None and _last_step(out) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            p.wait()
        assert kills >= 2, "the run finished before it could be killed; make it longer"
        p = _launch(sine_corpus, out, log)
        assert p.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]

    got = storage.load_tensors(out / "model.safetensors")[0]
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    # metrics.jsonl holds each step once, although steps after a checkpoint were redone.
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("split") != "valid"]
    assert steps == list(range(1, STEPS + 1))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [12, 10]  # keep_last=2
