"""The frozen and fine-tune probes share one epoch loop (batches per seeded epoch, one AdamW
step, one scoring pass) and give the records they gave with two loops of their own.

``tests/data_files/probe-records.expected.json`` was written by the two separate loops
(main at commit 8cdbb11: with the grid extension and the whitened solver) with
``AVIARY_WRITE_EXPECTED=1 pytest tests/evaluate/test_probe_loops.py``.
Never regenerate it to make this test pass. One edit since, by hand: when the solver's default
tolerance became ``auto`` (None), the AdamW cases' ``config.tol`` became None and the L-BFGS case
pins the old ``tol=1e-4`` (its key gains ``|tol=0.0001``); nothing else changed. A second: every
record gained ``lr_source: null`` and ``config.lr_per: "probe"`` (lr chosen once per sweep, a
new option whose default is the old behaviour). A third: the L2 path now starts in the middle of
the grid by default; the L-BFGS case pins ``l2_start="strongest"`` (the old path: its key gains
``|l2_start=strongest``, its config the field) and every record's config gained ``l2_start``. A fourth
(issue 15, session 6): frozen frame-level splits are standardised once and the weighted sum mixes
them in float32 (before, under the head's bf16 autocast), so the ``frozen-phone-linear-adam-weighted``
record alone was rewritten from that code (its layer weights moved by 6e-5, two early valid
evaluations by one frame); every other record stayed as it was. On the machine and torch version that wrote it
the records are compared exactly; elsewhere floats to 1e-6.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from aviary.evaluate.cache import open_cache
from aviary.evaluate.probe import ProbeConfig, run_probe
from aviary.evaluate.tasks import load_splits
from aviary.evaluate.upstreams import describe_upstream

from evaluate_fakes import OracleUpstream
from expectations import close, differences, machine

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "probe-records.expected.json"

#: name -> (task, finetune, config): AdamW frames / pooled (learning rate chosen on valid),
#: L-BFGS, fine-tuning frames and pooled with a weighted sum.
CASES = {
    "frozen-phone-mlp1-lrgrid": ("phone", ProbeConfig(task="phone", head="mlp1", layer="2", hidden=16, steps=30,
                                                      eval_every=10, lr_grid=(1e-3, 1e-2), batch_frames=256)),
    "frozen-phone-linear-adam-weighted": ("phone", ProbeConfig(task="phone", head="linear", layer="weighted",
                                                               solver="adam", steps=25, lr=1e-2, batch_frames=200)),
    "frozen-speaker-mlp1": ("speaker", ProbeConfig(task="speaker", head="mlp1", layer="1", hidden=16, steps=20,
                                                   eval_every=5, patience=2, lr=1e-2, batch_utterances=8)),
    "frozen-phone-lbfgs": ("phone", ProbeConfig(task="phone", head="linear", layer="1", tol=1e-4,
                                                l2_start="strongest")),
    "finetune-phone": ("phone", ProbeConfig(task="phone", head="linear", layer="2", finetune=True, steps=12,
                                            eval_every=4, lr=1e-2, upstream_lr=1e-2, batch_seconds=8.0)),
    "finetune-speaker-weighted-lrgrid": ("speaker", ProbeConfig(task="speaker", head="linear", layer="weighted",
                                                                finetune=True, steps=8, eval_every=4,
                                                                lr_grid=(1e-3, 3e-2), upstream_lr=1e-3,
                                                                batch_seconds=8.0)),
}



def _record(name, corpus, cache):
    task, cfg = CASES[name]
    splits = load_splits(corpus, task)
    if cfg.finetune:
        up = OracleUpstream()
        rec = run_probe(cfg, splits, upstream=up, upstream_info=describe_upstream(up, "oracle").to_dict())
        rec["upstream_after"] = [float(v) for v in up.mix.weight.detach().flatten()[:20]]
    else:
        rec = run_probe(cfg, splits, cache=cache)
    # Time, and the path of the session's temporary cache, differ from run to run.
    return json.loads(json.dumps({k: v for k, v in rec.items() if k not in ("train_seconds", "cache")}))



@pytest.fixture(scope="module")
def records(corpus, oracle_cache):
    cache = open_cache(oracle_cache)
    got = {name: _record(name, corpus, cache) for name in CASES}
    if os.environ.get("AVIARY_WRITE_EXPECTED") == "1":
        EXPECTED.write_text(json.dumps({"machine": machine(), "records": got}, indent=1, sort_keys=True) + "\n")
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_probe_record_is_unchanged(records, name):
    expected = json.loads(EXPECTED.read_text())
    ref, got = expected["records"][name], records[name]
    if expected["machine"] == machine():
        assert got == ref, differences(got, ref, 0.0)
    else:
        # Another CPU rounds differently: L-BFGS stops at another point below its tolerance (the
        # gradient norm it stopped at, and near-zero losses, move; accuracies, iterations and
        # the converged flags must not), AdamW weights move by float32 rounding.
        loose = {"grad_norm": math.inf, "valid_loss": 1e-4, "upstream_after": 1e-5}
        assert close(got, ref, key_tol=loose), differences(got, ref, key_tol=loose)
