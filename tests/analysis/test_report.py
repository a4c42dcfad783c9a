"""Key results, generated findings and the self-contained HTML report, from hand-made records."""
import base64
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from aviary.analysis.report import best_layer, findings, format_key_results, key_results, write_report  # noqa: E402


def _rec(up, task, head, layer, valid, test, params=1000, nhs=4, kind="mam"):
    return {"upstream": up, "task": task, "head": head, "layer": layer, "mode": "frozen", "label_fraction": 1.0,
            "valid_acc": valid, "test_acc": test, "upstream_params": params, "num_hidden_states": nhs,
            "upstream_kind": kind}


def _records():
    recs = []
    # Mockingjay: best valid at layer 2 (test 0.70), layer 3 has a higher TEST but lower valid.
    for layer, (v, t) in enumerate([(0.40, 0.41), (0.60, 0.61), (0.72, 0.70), (0.65, 0.75)]):
        recs.append(_rec("mj", "phone", "linear", layer, v, t, params=4000))
    recs.append(_rec("mj", "phone", "linear", "weighted", 0.73, 0.72, params=4000))
    for layer, (v, t) in enumerate([(0.35, 0.36), (0.55, 0.56), (0.68, 0.66), (0.66, 0.64)]):
        recs.append(_rec("aa", "phone", "linear", layer, v, t, params=1000))
    recs.append(_rec("aa", "speaker", "linear", 1, 0.9, 0.88, params=1000))
    recs.append(_rec("mj", "speaker", "linear", 1, 0.95, 0.93, params=4000))
    recs.append(_rec("logmel", "phone", "linear", 0, 0.50, 0.49, params=0, nhs=1, kind="features"))
    recs.append(_rec("random-init", "phone", "linear", 3, 0.30, 0.31, params=4000))
    return recs


def test_best_layer_is_chosen_on_validation():
    r = best_layer(_records(), "mj", "phone", "linear")
    assert r["layer"] == 2 and r["test_acc"] == 0.70
    assert best_layer(_records(), "mj", "phone", "mlp1") is None


def test_key_results_and_findings():
    recs = _records()
    rows = key_results(recs, roles={"random-init": "random"})
    by = {r["upstream"]: r for r in rows}
    assert by["logmel"]["role"] == "baseline" and by["mj"]["role"] == "pretrained"
    assert by["random-init"]["role"] == "random"
    assert by["mj"]["phone_linear"] == 0.70 and by["mj"]["phone_linear_weighted"] == 0.72
    assert by["aa"]["speaker_linear"] == 0.88
    table = format_key_results(rows)
    assert "70.0 (2)" in table and "49.0" in table
    summary = {"key_results": rows,
               "models": {"mj": {"shared": False}, "aa": {"shared": True}},
               "attention": {"mj": {"adjacent_mean": 0.3, "off_diagonal_mean": 0.4},
                             "aa": {"adjacent_mean": 0.1, "off_diagonal_mean": 0.2}}}
    text = " ".join(findings(summary))
    # Every number comes from the records: best pretrained 70.0 vs baseline 49.0 -> +21.0 points.
    assert "beats the best spectrogram baseline (logmel, 49.0 %) by +21.0 points" in text
    assert "layer 2 of 3" in text
    # AALBERT 66.0 / Mockingjay 70.0 = 94.3 %, 1000 / 4000 parameters = 25 %.
    assert "94.3 % of Mockingjay's" in text and "25 % of its parameters" in text
    assert "more similar" in text and "+39.0 points" in text  # 70.0 - 31.0 over random init


def test_findings_say_when_baseline_wins():
    recs = [_rec("mj", "phone", "linear", 1, 0.3, 0.3), _rec("logmel", "phone", "linear", 0, 0.5, 0.5, nhs=1,
                                                                kind="features")]
    text = " ".join(findings({"key_results": key_results(recs), "models": {"mj": {"shared": False}}}))
    assert "does not beat" in text and "-20.0 points" in text


def test_report_embeds_every_figure(tmp_path):
    figs = {}
    for name in ("probing", "weights", "jsd", "spectrogram"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        figs[name] = tmp_path / f"{name}.png"
        fig.savefig(figs[name])
        plt.close(fig)
    rows = key_results(_records())
    summary = {"corpus": {"path": "c", "utterances": 10, "speakers": 2, "hours": 0.01,
                          "splits": {"train": 8, "valid": 1, "test": 1}},
               "models": {"mj": {"params": 4000, "shared": False, "pretrain_steps": 5, "pretrain_seconds": 1.0,
                                 "final_train_loss": 1.0, "final_valid_loss": None,
                                 "param_table": [{"component": "transformer layers", "params": 10, "applications": 3,
                                                  "unshared_params": 10, "shared": False}]}},
               "probes": _records(), "key_results": rows, "findings": ["a <finding> & more"],
               "demo": {"command": "aviary demo --out x", "wall_seconds": 60.0, "config": {"steps": 5}}}
    path = write_report(summary, figs, tmp_path / "report.html")
    text = path.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) == 4
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "a &lt;finding&gt; &amp; more" in text  # escaped
    assert "src=\"http" not in text and "<script" not in text  # self-contained, static
    # A missing figure is said, not silently dropped.
    text2 = write_report(summary, {**figs, "jsd": None}, tmp_path / "r2.html").read_text()
    assert "attention JSD heatmaps: not produced" in text2


def test_findings_warn_about_collapsed_layers():
    rows = key_results(_records())
    text = " ".join(findings({"key_results": rows, "models": {},
                              "layer_spread": {"mj": [0.9, 0.2, 0.001, 0.0005], "logmel": [0.0]}}))
    assert "layers 2, 3 of mj hardly vary" in text and "logmel" not in text.split("Warning")[1]


def test_a_model_that_did_not_learn_is_said_first_and_compared_with_nothing():
    from aviary.analysis.report import ROLE_NOT_LEARNED

    recs = _records()
    rows = key_results(recs, roles={"random-init": "random", "mj": ROLE_NOT_LEARNED})
    summary = {"key_results": rows,
               "models": {"mj": {"shared": False, "learned": False, "final_valid_loss": 0.7856,
                                 "utt_mean_valid_loss": 0.7945, "plateau_ratio": 0.7856 / 0.7945,
                                 "learned_ratio": 0.85},
                          "aa": {"shared": True, "learned": True}},
               "attention": {"mj": {"adjacent_mean": 0.3, "off_diagonal_mean": 0.4},
                             "aa": {"adjacent_mean": 0.1, "off_diagonal_mean": 0.2}}}
    out = findings(summary)
    assert out[0].startswith("mj did not learn") and "98.9 %" in out[0] and "85 %" in out[0]
    text = " ".join(out[1:])
    # No AALBERT-vs-Mockingjay ratio, no attention comparison, and the best pretrained model
    # compared with the baseline is aa (66.0), not the unlearned mj (70.0).
    assert "of Mockingjay's" not in text and "Attention:" not in text
    assert "(aa, 66.0 %) beats the best spectrogram baseline (logmel, 49.0 %) by +17.0 points" in text


def test_a_masked_prediction_model_that_did_not_learn_names_its_own_plateau():
    # BEST-RQ / HuBERT: the plateau is the code-frequency cross-entropy, not an L1.
    summary = {"key_results": key_results(_records()),
               "models": {"hubert": {"shared": False, "learned": False, "final_valid_loss": 4.02,
                                     "utt_mean_valid_loss": None, "final_plateau_loss": 4.02,
                                     "plateau_loss": 4.50, "plateau_ratio": 4.02 / 4.50, "learned_ratio": 0.85,
                                     "plateau": "the code-frequency (unigram) cross-entropy"}}}
    first = findings(summary)[0]
    assert first.startswith("hubert did not learn: its final validation cross-entropy (4.0200) is 89.3 % of "
                            "the code-frequency (unigram) cross-entropy (4.5000)"), first
    assert "L1" not in first


def test_seeds_are_averaged_with_their_spread():
    from aviary.analysis.demo import base_name
    from aviary.analysis.report import aggregate_seeds

    recs = []
    for name, accs in (("mj", (0.70, 0.60)), ("mj-s1", (0.74, 0.62)), ("mj-s2", (0.72, 0.61))):
        for layer, (t) in enumerate(accs):
            recs.append(_rec(name, "phone", "linear", layer, t, t))
    recs.append(_rec("logmel", "phone", "linear", 0, 0.50, 0.49, params=0, nhs=1, kind="features"))
    rows = aggregate_seeds(key_results(recs), base_name)
    by = {r["upstream"]: r for r in rows}
    assert set(by) == {"mj", "logmel"} and by["mj"]["seeds"] == ["mj", "mj-s1", "mj-s2"]
    assert abs(by["mj"]["phone_linear"] - 0.72) < 1e-9 and abs(by["mj"]["phone_linear_sd"] - 0.02) < 1e-9
    assert by["mj"]["phone_linear_min"] == 0.70 and by["mj"]["phone_linear_n"] == 3
    assert by["logmel"]["phone_linear_n"] == 1 and by["logmel"]["phone_linear_sd"] == 0.0
    table = format_key_results(rows)
    assert "72.0 ± 2.0 (0)" in table and "49.0" in table and "49.0 ±" not in table


def test_findings_mark_differences_against_their_intervals():
    recs = _records()
    for r in recs:
        # Wide intervals everywhere except a tight pair (mj best layer vs logmel).
        r["test_ci"] = [r["test_acc"] - 0.2, r["test_acc"] + 0.2]
    for r in recs:
        if (r["upstream"], r["layer"]) in (("mj", 2), ("logmel", 0)):
            r["test_ci"] = [r["test_acc"] - 0.01, r["test_acc"] + 0.01]
    rows = key_results(recs, roles={"random-init": "random"})
    by = {r["upstream"]: r for r in rows}
    assert by["mj"]["phone_linear_ci"] == (0.69, 0.71)
    text = " ".join(findings({"key_results": rows, "models": {"mj": {"shared": False}, "aa": {"shared": True}}}))
    # mj 70.0 [69, 71] vs logmel 49.0 [48, 50]: separated; aa 66.0 [46, 86] vs logmel: not.
    assert "by +21.0 points [larger than the 95 % intervals]" in text
    assert "aa is +17.0 points from that baseline [within the 95 % intervals: not a clear difference]" in text
    # Without intervals (older records) nothing is marked.
    plain = " ".join(findings({"key_results": key_results(_records()), "models": {}}))
    assert "intervals" not in plain


def test_every_pretrained_model_gets_its_own_gain_over_random_init():
    # Not only the best: a model can learn its objective and little about phones (BEST-RQ
    # in the demo: +0.4 over random-init while HuBERT gained +4.9).
    rows = key_results(_records(), roles={"random-init": "random"})
    text = findings({"key_results": rows, "models": {}})
    assert "so pretraining adds +39.0 points." in " ".join(text)
    assert "Over that random-init level: aa +35.0 points." in text
