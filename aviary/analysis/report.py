"""The study's summary: key numbers, generated findings, and one self-contained HTML page.

:func:`key_results` condenses the probe records (one per upstream: best layer for phonemes
with the linear and MLP heads, the weighted sum, speakers), :func:`findings` turns them into
sentences (best layer, AALBERT vs Mockingjay per parameter, pretrained vs the spectrogram
baseline), and :func:`write_report` writes ``report.html`` with every figure embedded as a
base64 PNG, so the page can be mailed or opened offline.

The best layer of an upstream is chosen by *validation* accuracy and its *test* accuracy is
reported (choosing by test accuracy would flatter every model).
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from aviary.analysis.spread import COLLAPSE_THRESHOLD, collapsed_layers
from aviary.evaluate.results import largest_fraction, test_interval
from aviary.storage import write_text_atomic

log = logging.getLogger(__name__)

#: Roles of the upstreams in a study, used to phrase the findings.
ROLE_PRETRAINED = "pretrained"
ROLE_BASELINE = "baseline"
ROLE_RANDOM = "random"
#: A pretrained model whose final loss stayed on the plateau: shown, never compared.
ROLE_NOT_LEARNED = "not learned"


def _frozen(recs: Sequence[dict[str, Any]], upstream: str, task: str, head: str) -> list[dict[str, Any]]:
    """Frozen probes of one upstream, task and head, at the task's largest label fraction."""
    return [r for r in largest_fraction(recs) if r["upstream"] == upstream and r["task"] == task and r["head"] == head]


def best_layer(recs: Sequence[dict[str, Any]], upstream: str, task: str, head: str) -> dict[str, Any] | None:
    """The single-layer record with the best validation accuracy (ties: lower layer), or None."""
    cands = [r for r in _frozen(recs, upstream, task, head) if isinstance(r["layer"], int)]
    if not cands:
        return None
    return max(cands, key=lambda r: (r["valid_acc"], -r["layer"]))


def weighted_record(recs: Sequence[dict[str, Any]], upstream: str, task: str, head: str) -> dict[str, Any] | None:
    """The weighted-sum record of an upstream, or None."""
    cands = [r for r in _frozen(recs, upstream, task, head) if r["layer"] == "weighted"]
    return cands[-1] if cands else None


def key_results(recs: Sequence[dict[str, Any]], roles: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per upstream with its headline numbers (test accuracy at the best-valid layer).

    Args:
        recs: probe records (``results.jsonl``).
        roles: upstream name -> ``pretrained`` / ``baseline`` / ``random`` (default: from
            ``upstream_kind``: ``features`` is a baseline, names starting ``random:`` random).

    Returns:
        Rows ``{upstream, role, params, phone_linear, phone_linear_layer, phone_linear_weighted,
        phone_mlp1, phone_mlp1_layer, speaker_linear, speaker_linear_layer}`` (accuracies in
        [0, 1] or None) and, for each accuracy ``K``, ``K_ci``: its 95 % test interval
        ``(low, high)`` or None, in first-seen order of the upstreams.
    """
    roles = dict(roles or {})
    order: list[str] = []
    for r in recs:
        if r["upstream"] not in order:
            order.append(r["upstream"])
    rows = []
    for up in order:
        first = next(r for r in recs if r["upstream"] == up)
        role = roles.get(up) or (ROLE_BASELINE if first.get("upstream_kind") == "features" else
                                 ROLE_RANDOM if up.startswith("random") else ROLE_PRETRAINED)
        row: dict[str, Any] = {"upstream": up, "role": role, "params": int(first.get("upstream_params", 0)),
                               "num_hidden_states": int(first.get("num_hidden_states", 1))}
        for task, head in (("phone", "linear"), ("phone", "mlp1"), ("speaker", "linear")):
            b = best_layer(recs, up, task, head)
            row[f"{task}_{head}"] = b["test_acc"] if b else None
            row[f"{task}_{head}_layer"] = b["layer"] if b else None
            row[f"{task}_{head}_ci"] = test_interval(b) if b else None
            w = weighted_record(recs, up, task, head)
            row[f"{task}_{head}_weighted"] = w["test_acc"] if w else None
            row[f"{task}_{head}_weighted_ci"] = test_interval(w) if w else None
        rows.append(row)
    return rows


#: The accuracies of a key-results row that :func:`aggregate_seeds` averages.
ACCURACY_KEYS = ("phone_linear", "phone_linear_weighted", "phone_mlp1", "phone_mlp1_weighted",
                 "speaker_linear", "speaker_linear_weighted")


def aggregate_seeds(rows: Sequence[dict[str, Any]], group: Any) -> list[dict[str, Any]]:
    """Average key-results rows of the same upstream over pretraining seeds.

    Args:
        rows: :func:`key_results` rows, one per (upstream, seed).
        group: ``name -> upstream name`` (e.g. ``mockingjay-s1`` -> ``mockingjay``).

    Returns:
        One row per group, in first-seen order: the accuracies of :data:`ACCURACY_KEYS` are
        means over the seeds, with ``<key>_sd`` (sample standard deviation, 0 for one seed),
        ``<key>_min`` / ``<key>_max`` and ``<key>_n``; layers are those of the first seed;
        ``seeds`` lists the member rows' names; a role other than ``pretrained`` in any
        member (e.g. a seed that did not learn) is the group's role.
    """
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(group(r["upstream"]), []).append(r)
    out = []
    for name, members in groups.items():
        row = {**members[0], "upstream": name, "seeds": [m["upstream"] for m in members]}
        odd = [m["role"] for m in members if m["role"] != members[0]["role"]]
        if odd:
            row["role"] = odd[0]
        for k in ACCURACY_KEYS:
            vals = [m[k] for m in members if m.get(k) is not None]
            if not vals:
                continue
            row[k] = statistics.mean(vals)
            row[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            if len(vals) > 1:
                row.pop(f"{k}_ci", None)  # the first seed's interval is not the mean's
            row[f"{k}_min"], row[f"{k}_max"], row[f"{k}_n"] = min(vals), max(vals), len(vals)
        out.append(row)
    return out


def separation(a: dict[str, Any], a_key: str, b: dict[str, Any], b_key: str) -> bool | None:
    """Whether ``a[a_key]`` and ``b[b_key]`` differ by more than their 95 % intervals (the
    intervals do not overlap); None when either has no interval."""
    ia, ib = a.get(f"{a_key}_ci"), b.get(f"{b_key}_ci")
    if not ia or not ib:
        return None
    return ia[0] > ib[1] or ib[0] > ia[1]


def _mark(a: dict[str, Any], a_key: str, b: dict[str, Any], b_key: str) -> str:
    """The finding's note on one stated difference: larger than the intervals, or not."""
    sep = separation(a, a_key, b, b_key)
    if sep is None:
        return ""
    return (" [larger than the 95 % intervals]" if sep else
            " [within the 95 % intervals: not a clear difference]")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mean_sd(row: dict[str, Any], key: str) -> str:
    """``52.0`` or, for a mean over seeds, ``52.0 ± 0.8`` (sample standard deviation)."""
    v = row.get(key)
    if v is None:
        return "-"
    if row.get(f"{key}_n", 1) > 1:
        return f"{100 * v:.1f} ± {100 * row[f'{key}_sd']:.1f}"
    return f"{100 * v:.1f}"


def _acc_cell(row: dict[str, Any], key: str, layer_word: str, interval: bool = False) -> str:
    """Test accuracy % of ``row[key]`` (± its spread over seeds), with its best-valid layer in
    brackets for multi-layer upstreams (the first seed's, when averaged) and, with
    ``interval``, its 95 % interval (single runs)."""
    v = row.get(key)
    if v is None:
        return "-"
    ci = row.get(f"{key}_ci") if interval else None
    text = _mean_sd(row, key) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    layer = row.get(f"{key}_layer")
    if row["num_hidden_states"] > 1 and layer is not None:
        return f"{text} ({layer_word}{layer})"
    return text


def format_key_results(rows: Sequence[dict[str, Any]]) -> str:
    """A compact plain-text table of :func:`key_results` (test accuracy %, best-valid layer)."""
    header = ["upstream", "params", "phone lin (layer)", "phone lin wsum", "phone mlp1 (layer)",
              "spk lin (layer)"]
    table = [header]
    for r in rows:
        def cell(k: str) -> str:
            return _acc_cell(r, k, "")
        table.append([r["upstream"], _fmt_params(r["params"]), cell("phone_linear"), _mean_sd(r, "phone_linear_weighted"),
                      cell("phone_mlp1"), cell("speaker_linear")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def findings(summary: dict[str, Any], mockingjay: str | None = None, aalbert: str | None = None) -> list[str]:
    """Sentences stating what the numbers show (every number is taken from ``summary``).

    Args:
        summary: with ``key_results`` rows, ``models`` and optionally ``attention``.
        mockingjay, aalbert: the names of the two pretrained models compared (default: the
            first unshared and the first shared pretrained model in ``summary["models"]``).

    Returns:
        A list of plain-text sentences.
    """
    rows = {r["upstream"]: r for r in summary.get("key_results", [])}
    models = summary.get("models", {})
    if mockingjay is None:
        mockingjay = next((n for n, m in models.items() if not m.get("shared")), None)
    if aalbert is None:
        aalbert = next((n for n, m in models.items() if m.get("shared")), None)
    out: list[str] = []
    # First, in plain words: a model that stayed on the plateau has learned nothing to compare.
    for name, m in models.items():
        if m.get("learned") is False:
            if m.get("utt_mean_valid_loss") is not None:  # reconstruction: L1 against the utterance mean
                loss = (f"final validation L1 ({m['final_valid_loss']:.4f}) is {100 * m['plateau_ratio']:.1f} % "
                        f"of the utterance-mean predictor's ({m['utt_mean_valid_loss']:.4f})")
            else:  # masked prediction of codes: cross-entropy against the codes' frequencies
                loss = (f"final validation cross-entropy ({m['final_plateau_loss']:.4f}) is "
                        f"{100 * m['plateau_ratio']:.1f} % of {m['plateau']} ({m['plateau_loss']:.4f})")
            out.append(f"{name} did not learn: its {loss} on the same frames (a model that learned is at most "
                       f"{100 * m.get('learned_ratio', 0.85):.0f} %). Its probes are listed, but no comparison "
                       "is drawn from it.")
    pretrained = [r for r in rows.values() if r["role"] == ROLE_PRETRAINED and r.get("phone_linear") is not None]
    baselines = [r for r in rows.values() if r["role"] == ROLE_BASELINE and r.get("phone_linear") is not None]
    randoms = [r for r in rows.values() if r["role"] == ROLE_RANDOM and r.get("phone_linear") is not None]

    for r in pretrained:
        L = r["num_hidden_states"] - 1
        where = ("the last layer" if r["phone_linear_layer"] == L else
                 "the embedding output (layer 0)" if r["phone_linear_layer"] == 0 else
                 f"layer {r['phone_linear_layer']} of {L}")
        s = (f"{r['upstream']}: phonemes are most linearly decodable at {where} "
             f"({_pct(r['phone_linear'])} % test accuracy, chosen on validation)")
        if r.get("phone_linear_weighted") is not None:
            s += f"; the learned weighted sum of all layers gives {_pct(r['phone_linear_weighted'])} %"
        if r.get("speaker_linear") is not None:
            s += (f". Speakers peak at layer {r['speaker_linear_layer']} "
                  f"({_pct(r['speaker_linear'])} %)")
        out.append(s + ".")

    if pretrained and baselines:
        best_p = max(pretrained, key=lambda r: r["phone_linear"])
        best_b = max(baselines, key=lambda r: r["phone_linear"])
        diff = 100 * (best_p["phone_linear"] - best_b["phone_linear"])
        verdict = "beats" if diff > 0 else "does not beat"
        out.append(f"With a linear probe, the best pretrained representation ({best_p['upstream']}, "
                   f"{_pct(best_p['phone_linear'])} %) {verdict} the best spectrogram baseline "
                   f"({best_b['upstream']}, {_pct(best_b['phone_linear'])} %) by {diff:+.1f} points"
                   f"{_mark(best_p, 'phone_linear', best_b, 'phone_linear')} "
                   f"(Mockingjay paper: +11.8 points for BASE over mel features).")
        for r in pretrained:
            if r is best_p:
                continue
            d = 100 * (r["phone_linear"] - best_b["phone_linear"])
            out.append(f"{r['upstream']} is {d:+.1f} points from that baseline"
                       f"{_mark(r, 'phone_linear', best_b, 'phone_linear')}.")
    if pretrained and randoms:
        best_r = max(randoms, key=lambda r: r["phone_linear"])
        best_p = max(pretrained, key=lambda r: r["phone_linear"])
        out.append(f"A randomly initialised encoder of the same shape ({best_r['upstream']}) reaches "
                   f"{_pct(best_r['phone_linear'])} %, so pretraining adds "
                   f"{100 * (best_p['phone_linear'] - best_r['phone_linear']):+.1f} points"
                   f"{_mark(best_p, 'phone_linear', best_r, 'phone_linear')}.")
        others = [f"{r['upstream']} {100 * (r['phone_linear'] - best_r['phone_linear']):+.1f}"
                  f"{_mark(r, 'phone_linear', best_r, 'phone_linear')}" for r in pretrained if r is not best_p]
        if others:  # every model's own gain: a model can learn its objective and little about phones
            out.append(f"Over that random-init level: {'; '.join(others)} points.")

    if (mockingjay in rows and aalbert in rows and rows[mockingjay].get("phone_linear")
            and rows[aalbert].get("phone_linear")
            and rows[mockingjay]["role"] == rows[aalbert]["role"] == ROLE_PRETRAINED):
        m, a = rows[mockingjay], rows[aalbert]
        ratio_acc = a["phone_linear"] / m["phone_linear"]
        ratio_par = a["params"] / max(m["params"], 1)
        out.append(f"Audio ALBERT ({aalbert}, {_fmt_params(a['params'])} parameters) reaches "
                   f"{100 * ratio_acc:.1f} % of Mockingjay's ({mockingjay}, {_fmt_params(m['params'])}) best "
                   f"linear phoneme accuracy ({_pct(a['phone_linear'])} vs {_pct(m['phone_linear'])} %"
                   f"{_mark(a, 'phone_linear', m, 'phone_linear')}) with "
                   f"{100 * ratio_par:.0f} % of its parameters ({100 * (1 - ratio_par):.0f} % fewer; "
                   f"the paper: comparable accuracy with 91 % fewer at 12 layers).")
        if m.get("speaker_linear") is not None and a.get("speaker_linear") is not None:
            out.append(f"On speaker identification (linear, mean-pooled) AALBERT gets {_pct(a['speaker_linear'])} % "
                       f"and Mockingjay {_pct(m['speaker_linear'])} %"
                       f"{_mark(a, 'speaker_linear', m, 'speaker_linear')}.")

    for name, spread in summary.get("layer_spread", {}).items():
        bad = collapsed_layers(spread)
        if bad and rows.get(name, {}).get("role") == ROLE_PRETRAINED:
            out.append(f"Warning: layers {', '.join(map(str, bad))} of {name} hardly vary from frame to frame "
                       f"(frame spread {min(spread[k] for k in bad):.4f}-{max(spread[k] for k in bad):.4f} < "
                       f"{COLLAPSE_THRESHOLD}; healthy layers are > 0.3): the model is still on the "
                       f"'average spectrum' plateau of early pretraining, and linear probes on those layers "
                       f"stay at the majority class. Pretrain longer (more steps) before reading the layer curve.")

    att = summary.get("attention", {})
    if mockingjay in att and aalbert in att and all(models.get(n, {}).get("learned") is not False
                                                    for n in (mockingjay, aalbert)):
        am = att[mockingjay]["adjacent_mean"]
        aa = att[aalbert]["adjacent_mean"]
        pa, pm = att[aalbert]["off_diagonal_mean"], att[mockingjay]["off_diagonal_mean"]
        more = "more similar" if aa < am else "less similar"
        agree = ("as the paper reports for shared layers" if aa < am and pa < pm else
                 "unlike the paper, which finds shared layers attend more alike" if aa >= am and pa >= pm else
                 "a mixed picture (the paper finds shared layers attend more alike)")
        out.append(f"Attention: consecutive layers of AALBERT attend {more} to each other than Mockingjay's "
                   f"(mean JSD between adjacent layers {aa:.3f} vs {am:.3f} bits; over all layer pairs "
                   f"{pa:.3f} vs {pm:.3f}): {agree}.")
    return out


def _img(path: str | Path | None, alt: str) -> str:
    if not path or not Path(path).is_file():
        return f'<p class="missing">({html.escape(alt)}: not produced)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_loss(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; } pre { padding: 0.6em; overflow-x: auto; }
.findings li { margin-bottom: 0.4em; } .missing { color: #a00; }
"""


def _page_head(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """Doctype, title, style, the page's heading and, for a demo, the command that made it."""
    demo = summary.get("demo", {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>aviary: Mockingjay vs Audio ALBERT</title><style>{_CSS}</style></head><body>",
             "<h1>Mockingjay vs Audio ALBERT on synthetic speech</h1>",
             "<p>Self-supervised masked acoustic models pretrained and probed layer by layer, "
             "reproducing the study of the Audio ALBERT paper (Chi et al. 2021) at CPU scale.</p>"]
    if demo.get("command"):
        parts.append(f"<p>Produced by <code>{html.escape(demo['command'])}</code>"
                     + (f" in {demo['wall_seconds'] / 60:.1f} minutes" if demo.get("wall_seconds") else "")
                     + ".</p>")
    return parts


def _findings_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    return ["<h2>Findings</h2><ul class='findings'>"
            + "".join(f"<li>{html.escape(s)}</li>" for s in summary.get("findings", [])) + "</ul>"]


def _key_results_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """Test accuracy of every upstream's frozen probes, with intervals (and spread over seeds)."""
    kr = summary.get("key_results", [])
    if not kr:
        return []
    fracs = sorted({(r["task"], float(r.get("label_fraction", 1.0)))
                    for r in largest_fraction(summary.get("probes", []))})
    used = ", ".join(f"{t} {100 * f:g} %" for t, f in fracs) or "100 %"
    parts = ["<h2>Key results</h2><p>Test accuracy (%) of frozen probes (training labels used: "
             f"{html.escape(used)}) with the 95 % bootstrap interval over test utterances in square "
             "brackets; for single layers, the layer with the best validation accuracy (in "
             "brackets). Findings marked [larger than the 95 % intervals] compare accuracies whose "
             "intervals do not overlap.</p>"]
    rows = [[r["upstream"], r["role"], _fmt_params(r["params"])]
            + [_acc_cell(r, k, "layer ", interval=True) for k in ACCURACY_KEYS] for r in kr]
    parts.append(_table(["upstream", "role", "params", "phone linear", "phone linear, weighted sum",
                         "phone mlp1", "phone mlp1, weighted sum", "speaker linear",
                         "speaker linear, weighted sum"], rows))
    seeds = max((len(r.get("seeds", [])) for r in kr), default=0)
    if seeds > 1:
        parts.append(f"<p>Pretrained and random-init rows: mean ± standard deviation over {seeds} "
                     "pretraining seeds (each seed's rows are in <code>summary.json</code>, "
                     "<code>key_results_per_seed</code>).</p>")
    return parts


def _learning_curve_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    curve = summary.get("learning_curve") or {}
    if not curve:
        return []
    return ["<h2>Learning curve</h2><p>Best-layer linear phone accuracy (test %, layer chosen on "
            "validation) of the first seed's intermediate checkpoints; dashed: the random-init encoder, "
            "dotted: the best spectrogram baseline.</p>",
            _img(figures.get("learning_curve"), "accuracy vs pretraining steps"),
            _table(["model"] + [f"step {st}" for st in curve["steps"]],
                   [[n] + [_pct(v) for v in vals] for n, vals in curve["models"].items()])]


def _probing_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    parts = ["<h2>Probing accuracy per layer</h2>",
             "<p>Frozen features, test accuracy; lines are pretrained and random-init encoders over "
             "their layers (0 = embedding output), dashed horizontal lines the spectrogram baselines, "
             "stars the learned weighted sums.</p>",
             _img(figures.get("probing"), "accuracy vs layer")]
    if figures.get("weights"):
        parts.append("<h3>Learned weighted-sum weights</h3>" + _img(figures.get("weights"), "weighted-sum weights"))
    return parts


def _corpus_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    corpus = summary.get("corpus", {})
    splits = " / ".join(str(corpus.get("splits", {}).get(s, "-")) for s in ("train", "valid", "test"))
    return ["<h2>Corpus</h2>",
            _table(["corpus", "utterances", "speakers", "hours", "train / valid / test utterances"],
                   [[corpus.get("path", "-"), corpus.get("utterances", "-"), corpus.get("speakers", "-"),
                     f"{corpus.get('hours', 0):.2f}", splits]])]


def _model_row(name: str, m: dict[str, Any]) -> list[Any]:
    return [name, m.get("config_note", m.get("preset", "-")), "yes" if m.get("shared") else "no",
            _fmt_params(m.get("params", 0)), _fmt_params(m.get("head_params", 0)),
            m.get("pretrain_steps", "-"), f"{m.get('pretrain_seconds', 0):.0f}",
            _fmt_loss(m.get("final_train_loss")), _fmt_loss(m.get("final_valid_loss")),
            _fmt_loss(m.get("plateau_loss", m.get("utt_mean_valid_loss"))),
            {True: "yes", False: "NO (on the plateau)", None: "-"}[m.get("learned")]]


def _models_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """The models' table, then each model's parameter table."""
    models = summary.get("models", {})
    parts = ["<h2>Models</h2>",
             _table(["model", "preset / config", "layers shared", "upstream params", "+ head",
                     "pretrain steps", "pretrain seconds", "final train loss", "final valid loss",
                     "plateau (utterance-mean L1 / unigram CE)", "learned"],
                    [_model_row(n, m) for n, m in models.items()])]
    for n, m in models.items():
        rows = m.get("param_table") or []
        if rows:
            parts.append(f"<h3>Parameters of {html.escape(n)}</h3>")
            parts.append(_table(["component", "parameters", "applications per forward", "without sharing", "shared"],
                                [[r["component"], f"{r['params']:,}", r["applications"], f"{r['unshared_params']:,}",
                                  "yes" if r["shared"] else "no"] for r in rows]))
    return parts


def _spread_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    spread = summary.get("layer_spread", {})
    if not spread:
        return []
    n = max(len(v) for v in spread.values())
    return ["<h3>Frame spread per layer (collapse check)</h3><p>Mean over dimensions of the "
            "standard deviation across frames, relative to the features' RMS: ~1 varies freely, "
            "near 0 means every frame gets the same vector.</p>",
            _table(["upstream"] + [f"layer {k}" for k in range(n)],
                   [[name] + [f"{v:.3f}" for v in vals] + [""] * (n - len(vals))
                    for name, vals in spread.items()])]


def _attention_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    return ["<h2>Attention: Jensen-Shannon divergence between layers</h2>",
            "<p>JSD (bits, in [0, 1]) between the attention distributions of every pair of layers, "
            "per head and query position, averaged over heads, utterances and valid positions "
            "(the AALBERT paper's figure). Darker = more similar attention.</p>",
            _img(figures.get("jsd"), "attention JSD heatmaps")]


def _reconstruction_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    return ["<h2>Masked reconstruction</h2>",
            "<p>One validation utterance: input log-mel, the masked input the encoder sees, the "
            "model's reconstruction and the target (marks at the bottom: scored frames).</p>",
            _img(figures.get("spectrogram"), "input, masked input, reconstruction, target")]


def _settings_section(summary: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    demo = summary.get("demo", {})
    if not demo.get("config"):
        return []
    return ["<h2>Settings</h2><pre>" + html.escape(json.dumps(demo["config"], indent=2)) + "</pre>"]


#: The page, top to bottom: each builder takes ``(summary, figures)`` and returns its HTML
#: pieces (one line each in the file); a section with nothing to show returns none.
_SECTIONS = (_page_head, _findings_section, _key_results_section, _learning_curve_section,
             _probing_section, _corpus_section, _models_section, _spread_section,
             _attention_section, _reconstruction_section, _settings_section)


def write_report(summary: dict[str, Any], figures: dict[str, str | Path | None], path: str | Path) -> Path:
    """Write the self-contained HTML report.

    Args:
        summary: the study summary (``corpus``, ``models``, ``probes``, ``key_results``,
            ``findings``, optionally ``attention``, ``demo``).
        figures: ``probing`` (accuracy vs layer), ``weights`` (weighted-sum weights),
            ``jsd`` (attention heatmaps), ``spectrogram`` (reconstruction figure) -> PNG paths.
        path: the HTML file to write.

    Returns:
        ``path``.
    """
    path = Path(path)
    parts = [piece for section in _SECTIONS for piece in section(summary, figures)]
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))
    return path
