"""The report page is the same HTML, byte for byte, as before it was cut into section builders.

``tests/data_files/report.expected.html`` was written by the single 110-line ``write_report``
(commit cc7f6e3) with ``python tests/analysis/test_report_html.py``, for summaries that
reach every section (and, in the second, the branches a sparse summary takes). Never
regenerate it to make this test pass. One edit since, by hand: the models table's column
"utterance-mean predictor" became "plateau (utterance-mean L1 / unigram CE)" when the demo
gained masked-prediction models (issue 20); nothing else changed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from aviary.analysis.report import aggregate_seeds, key_results, write_report

EXPECTED = Path(__file__).resolve().parents[1] / "data_files" / "report.expected.html"
_SEPARATOR = "\n<!-- next report -->\n"


def _rec(up, task, head, layer, valid, test, params=1000, nhs=4, kind="mam", frac=1.0, ci=None):
    r = {"upstream": up, "task": task, "head": head, "layer": layer, "mode": "frozen", "label_fraction": frac,
         "valid_acc": valid, "test_acc": test, "upstream_params": params, "num_hidden_states": nhs,
         "upstream_kind": kind}
    if ci:
        r["test_ci"] = ci
    return r


def _records():
    recs = []
    for name, shift in (("mj", 0.0), ("mj-s1", 0.02)):
        for layer, (v, t) in enumerate([(0.40, 0.41), (0.60, 0.61), (0.72, 0.70), (0.65, 0.75)]):
            recs.append(_rec(name, "phone", "linear", layer, v + shift, t + shift, params=4_200_000))
            recs.append(_rec(name, "phone", "mlp1", layer, v + shift + 0.03, t + shift + 0.02, params=4_200_000))
        recs.append(_rec(name, "phone", "linear", "weighted", 0.73, 0.72 + shift, params=4_200_000))
        recs.append(_rec(name, "speaker", "linear", 1, 0.95, 0.93 - shift, params=4_200_000))
    for layer, (v, t) in enumerate([(0.35, 0.36), (0.55, 0.56), (0.68, 0.66), (0.66, 0.64)]):
        recs.append(_rec("aa", "phone", "linear", layer, v, t, params=1500, ci=[t - 0.03, t + 0.03]))
    recs.append(_rec("aa", "phone", "linear", 2, 0.30, 0.20, params=1500, frac=0.1))
    recs.append(_rec("aa", "speaker", "linear", "weighted", 0.9, 0.88, params=1500))
    recs.append(_rec("logmel", "phone", "linear", 0, 0.50, 0.49, params=0, nhs=1, kind="features",
                     ci=[0.47, 0.51]))
    recs.append(_rec("random-init", "phone", "linear", 3, 0.30, 0.31, params=4_200_000))
    return recs


def _figures(tmp: Path) -> dict[str, Path | None]:
    figs: dict[str, Path | None] = {}
    for i, name in enumerate(("probing", "weights", "learning_curve", "spectrogram")):
        figs[name] = tmp / f"{name}.png"
        figs[name].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(i, i + 40)))
    figs["jsd"] = None  # a figure not produced
    return figs


def _summaries() -> list[dict]:
    recs = _records()
    rows = aggregate_seeds(key_results(recs, roles={"random-init": "random"}),
                           lambda n: n.split("-s")[0])
    full = {
        "corpus": {"path": "/data/synth <speech>", "utterances": 120, "speakers": 6, "hours": 0.123,
                   "splits": {"train": 100, "valid": 10}},
        "models": {
            "mj": {"preset": "mockingjay-cpu", "params": 4_200_000, "head_params": 12_345, "shared": False,
                   "pretrain_steps": 400, "pretrain_seconds": 123.4, "final_train_loss": 0.51234,
                   "final_valid_loss": float("nan"), "utt_mean_valid_loss": 0.8, "learned": True,
                   "param_table": [{"component": "transformer layers", "params": 1_234_567, "applications": 3,
                                    "unshared_params": 1_234_567, "shared": False},
                                   {"component": "head & <out>", "params": 99, "applications": 1,
                                    "unshared_params": 99, "shared": True}]},
            "aa": {"config_note": "aalbert, 3 shared layers", "params": 1500, "shared": True,
                   "pretrain_steps": 400, "final_train_loss": None, "learned": False},
            "cfg": {},
        },
        "probes": recs, "key_results": rows,
        "findings": ["first & <second>", "third \"quoted\""],
        "learning_curve": {"steps": [0, 100, 400], "models": {"mj": [0.3, 0.5, None], "random-init": [0.31, 0.3, 0.31]}},
        "layer_spread": {"mj": [0.9, 0.5, 0.01, 0.002], "logmel": [0.7]},
        "demo": {"command": "aviary demo --out 'x y'", "wall_seconds": 754.0,
                 "config": {"steps": 400, "seeds": [0, 1], "note": "<b>"}},
    }
    sparse = {"findings": [], "models": {}, "demo": {"command": "aviary demo"}}
    return [full, sparse]


def _pages(tmp: Path) -> str:
    figs = _figures(tmp)
    pages = []
    for i, summary in enumerate(_summaries()):
        pages.append(write_report(summary, figs if i == 0 else {}, tmp / f"r{i}.html").read_text(encoding="utf-8"))
    return _SEPARATOR.join(pages)


def test_report_html_is_unchanged(tmp_path):
    assert _pages(tmp_path) == EXPECTED.read_text(encoding="utf-8")


if __name__ == "__main__":  # write the expectation (only with the implementation it guards)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        EXPECTED.write_text(_pages(Path(d)), encoding="utf-8")
    print(f"wrote {EXPECTED}", file=sys.stderr)
