"""SIGKILL `aviary extract` and `aviary probe` sweeps mid-run, resume, and check the outcome (issue 9)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aviary.data import load_manifest
from aviary.evaluate.cache import open_cache
from aviary.evaluate.results import load_records


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "aviary", "-q", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc, cond, timeout=120.0):
    """SIGKILL ``proc`` as soon as ``cond()`` holds; returns False if it finished first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if cond():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("the command made no progress before the timeout")


# Several fresh `python -m aviary` processes (torch import each): slow on a shared CPU.
@pytest.mark.slow
def test_extract_survives_sigkill(corpus, tmp_path):
    args = ["extract", "--checkpoint", "logmel", "--data", str(corpus), "--dtype", "float32", "--shard-seconds", "2"]
    out = tmp_path / "killed"
    killed = 0
    for _ in range(2):
        p = _start([*args, "--out", str(out)])
        killed += _kill_when(p, lambda: len(list(out.glob("shard-?????"))) >= 2 + 4 * killed)
    assert killed >= 1, "extraction finished before it could be killed; make the corpus larger"
    assert not (out / "index.json").exists()
    assert subprocess.run([sys.executable, "-m", "aviary", "-q", *args, "--out", str(out)]).returncode == 0
    ref = tmp_path / "ref"
    assert subprocess.run([sys.executable, "-m", "aviary", "-q", *args, "--out", str(ref)]).returncode == 0
    utts = load_manifest(corpus)
    a, b = open_cache(out, utterances=utts), open_cache(ref, utterances=utts)
    assert sorted(a.ids) == sorted(b.ids) == sorted(u.id for u in utts)
    for u in utts:
        np.testing.assert_array_equal(a.get(u.id, 0), b.get(u.id, 0))


@pytest.mark.slow
def test_probe_sweep_survives_sigkill(corpus, oracle_cache, tmp_path):
    out = tmp_path / "probes"
    args = ["probe", "--cache", str(oracle_cache), "--data", str(corpus), "--task", "phone,speaker",
            "--head", "linear,mlp1", "--layers", "all", "--steps", "20", "--out", str(out)]
    res = out / "results.jsonl"

    def n_lines():
        return len(res.read_text().splitlines()) if res.exists() else 0

    killed = 0
    for _ in range(3):
        p = _start(args)
        before = n_lines()
        killed += _kill_when(p, lambda: n_lines() >= before + 2)
    assert killed >= 1
    assert subprocess.run([sys.executable, "-m", "aviary", "-q", *args]).returncode == 0
    recs = load_records(out)
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 2 * 2 * 3
    lines = [l for l in res.read_text().splitlines() if l.strip()]
    assert len(lines) == 12  # no record was written twice
