"""Result records: append-only ``results.jsonl``, tables, CSV and the probing figures.

Each probe appends one JSON line to ``DIR/results.jsonl`` with (at least) ``key``,
``upstream``, ``upstream_params``, ``task``, ``head``, ``layer`` (int, ``"last"`` or
``"weighted"``), ``mode`` (``frozen`` / ``finetune``), ``label_fraction``, ``seed``,
``valid_acc``, ``test_acc``, ``test_ci`` (95 % bootstrap interval over test utterances),
``train_seconds``, ``solver`` (``lbfgs``: ``l2``, ``iterations``, ``converged``; ``adam``:
``lr``, ``steps_run``), ``upstream_lr`` (fine-tuning) and ``weights`` (softmax weighted-sum
weights, one per hidden state) - see :func:`aviary.evaluate.probe.make_record`. Records of
older versions (no ``test_ci``, no ``solver``) still load; the table shows "-" for what they lack.
Also ``precision`` (resolved),
``precision_requested`` and ``extract_precision`` - see :func:`aviary.evaluate.probe.make_record`.
Records written before issue 14 carried ``autocast`` (``none`` / ``bf16``) in their config and,
when it was not the default, in their key; :func:`load_records` reads them as ``precision``.

Appends are atomic in practice: the whole line goes out in one ``write`` on a file opened
with ``O_APPEND``, then ``fsync``. A kill mid-write can at worst leave a truncated last
line; :func:`load_records` skips it (with a warning) and the next append starts on a new
line, so a resumed sweep neither duplicates nor loses a finished probe.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from aviary.precision import LEGACY_AUTOCAST
from aviary.storage import append_jsonl, write_text_atomic

log = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
CSV_COLUMNS = ["upstream", "upstream_params", "task", "head", "layer", "mode", "label_fraction", "seed",
               "valid_acc", "test_acc", "train_seconds", "lr", "upstream_lr", "weights",
               "test_ci_low", "test_ci_high", "solver", "l2", "iterations", "converged", "steps_run"]
MEAN_CSV_COLUMNS = ["upstream", "task", "head", "layer", "mode", "label_fraction", "seeds", "test_mean", "test_std",
                    "test_min", "test_max", "test_ci_low", "test_ci_high", "valid_mean"]
GROUP_FIELDS = ("task", "upstream", "mode", "head", "label_fraction", "layer")


def results_path(out_dir: str | os.PathLike) -> Path:
    p = Path(out_dir)
    return p if p.suffix == ".jsonl" else p / RESULTS_NAME


def append_record(out_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as one line (single write, O_APPEND, fsync: :func:`aviary.storage.append_jsonl`)."""
    append_jsonl(results_path(out_dir), record,
                 hint="the records before it are intact, re-run the same command to continue")


def load_records(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of ``DIR/results.jsonl`` (or a ``.jsonl`` path); [] if none.

    Later records with the same ``key`` replace earlier ones (a re-run probe).
    """
    path = results_path(out_dir)
    if not path.is_file():
        return []
    recs: dict[str, dict[str, Any]] = {}
    bad = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            log.warning("%s:%d: skipping a truncated or malformed record", path, n)
            continue
        if not isinstance(rec, dict) or "key" not in rec:
            bad += 1
            log.warning("%s:%d: skipping a record without 'key'", path, n)
            continue
        rec = _upgrade_record(rec)
        recs[rec["key"]] = rec
    return list(recs.values())


def _upgrade_record(rec: dict[str, Any]) -> dict[str, Any]:
    """An old record (``autocast`` in config and key) in today's terms."""
    config = rec.get("config")
    if not isinstance(config, dict) or "autocast" not in config:
        return rec
    rec = dict(rec)
    config = dict(config)
    precision = LEGACY_AUTOCAST.get(config.pop("autocast"), "fp32")
    config.setdefault("precision", precision)
    rec["config"] = config
    rec.setdefault("precision", precision)
    rec.setdefault("precision_requested", precision)
    # The key names what was measured; precision is no longer part of it.
    rec["key"] = "|".join(p for p in str(rec["key"]).split("|") if not p.startswith("autocast="))
    return rec


def done_keys(out_dir: str | os.PathLike, require: str | None = None) -> set[str]:
    """Keys of the probes already recorded (what a resumed sweep skips); with ``require``,
    only of records that have that key."""
    return {r["key"] for r in load_records(out_dir) if require is None or require in r}


def _layer_sort(layer: Any) -> tuple[int, Any]:
    if isinstance(layer, int):
        return (0, layer)
    return (1, str(layer))


def sort_records(recs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(recs, key=lambda r: (r["task"], r["upstream"], r["mode"], r["head"],
                                       r["label_fraction"], _layer_sort(r["layer"]), r["seed"]))


def test_interval(r: dict[str, Any]) -> tuple[float, float] | None:
    """The record's 95 % test-accuracy interval, or None (records written before intervals)."""
    ci = r.get("test_ci")
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return float(ci[0]), float(ci[1])


def _fit_note(r: dict[str, Any]) -> str:
    solver = r.get("solver")
    if solver == "lbfgs":
        return (f"lbfgs l2={r['l2']:g} it={r.get('iterations_total', r.get('iterations'))}"
                + ("" if r.get("converged") else " NOT converged"))
    if solver == "adam":
        how = " (auto, sweep's)" if r.get("lr_source") else " (auto)" if r.get("lr_auto") else ""
        return f"adam lr={r['lr']:g}{how} {r.get('steps_run')}/{r.get('steps')} steps"
    return f"epochs={r['epochs']}" if r.get("epochs") is not None else "-"


def aggregate(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread of the test accuracy over seeds, per (task, upstream, mode, head, fraction, layer).

    Returns:
        One dict per group: the group fields, ``seeds`` (how many), ``test_mean``,
        ``test_std`` (sample standard deviation; 0 for one seed), ``test_min``, ``test_max``,
        ``test_ci_low`` / ``test_ci_high`` (the mean of the seeds' interval bounds, or None) and
        ``valid_mean``, in :func:`sort_records` order.
    """
    import statistics

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in sort_records(recs):
        groups[tuple(str(r.get(k)) for k in GROUP_FIELDS)].append(r)
    out = []
    for rs in groups.values():
        tests = [float(r["test_acc"]) for r in rs]
        cis = [test_interval(r) for r in rs]
        have = [c for c in cis if c is not None]
        row = {k: rs[0].get(k) for k in GROUP_FIELDS}
        row.update(seeds=len(rs), test_mean=statistics.fmean(tests),
                   test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
                   test_min=min(tests), test_max=max(tests),
                   test_ci_low=statistics.fmean(c[0] for c in have) if have else None,
                   test_ci_high=statistics.fmean(c[1] for c in have) if have else None,
                   valid_mean=statistics.fmean(float(r["valid_acc"]) for r in rs))
        out.append(row)
    return out


def format_table(recs: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the records, sorted by task, upstream, head, fraction, layer.

    ``test 95% CI`` is the bootstrap interval over test utterances; ``fit`` says how the probe
    was fitted. With several seeds of a probe a second table gives mean, standard deviation
    and range over the seeds.
    """
    rows = [["task", "upstream", "params", "mode", "head", "frac", "layer", "seed", "valid", "test", "test 95% CI",
             "secs", "fit"]]
    for r in sort_records(recs):
        ci = test_interval(r)
        rows.append([r["task"], r["upstream"], _fmt_params(r["upstream_params"]), r["mode"], r["head"],
                     f"{r['label_fraction']:g}", str(r["layer"]), str(r["seed"]),
                     f"{100 * r['valid_acc']:.2f}", f"{100 * r['test_acc']:.2f}",
                     f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else "-", f"{r['train_seconds']:.1f}", _fit_note(r)])
    lines = _align(rows, left=7)
    agg = [a for a in aggregate(recs)]
    if any(a["seeds"] > 1 for a in agg):
        rows = [["task", "upstream", "mode", "head", "frac", "layer", "seeds", "test mean", "sd", "min-max",
                 "mean 95% CI"]]
        for a in agg:
            ci = (f"{100 * a['test_ci_low']:.1f}-{100 * a['test_ci_high']:.1f}"
                  if a["test_ci_low"] is not None else "-")
            rows.append([a["task"], a["upstream"], a["mode"], a["head"], f"{a['label_fraction']:g}", str(a["layer"]),
                         str(a["seeds"]), f"{100 * a['test_mean']:.2f}", f"{100 * a['test_std']:.2f}",
                         f"{100 * a['test_min']:.1f}-{100 * a['test_max']:.1f}", ci])
        lines += ["", "over seeds (test accuracy %):"] + _align(rows, left=6)
    weighted = [r for r in sort_records(recs) if r.get("weights")]
    if weighted:
        lines += ["", "learned weighted-sum weights (hidden state 0 .. L):"]
        lines += [f"  {r['task']} {r['upstream']} {r['mode']} {r['head']} frac {r['label_fraction']:g} seed {r['seed']}: "
                  + " ".join(f"{w:.3f}" for w in r["weights"]) for r in weighted]
    return "\n".join(lines)


def _align(rows: list[list[str]], left: int) -> list[str]:
    """Columns padded to width: the first ``left`` (and the last) left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    n = len(widths)
    lines = ["  ".join(c.ljust(w) if (i < left or i == n - 1) else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def write_csv(recs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the records' main columns to ``path`` (weights as a space-separated list)."""
    rows = []
    for r in sort_records(recs):
        row = []
        ci = test_interval(r)
        for c in CSV_COLUMNS:
            v = r.get(c)
            if c == "weights" and v is not None:
                v = " ".join(f"{x:.4f}" for x in v)
            elif c in ("test_ci_low", "test_ci_high"):
                v = None if ci is None else ci[0 if c == "test_ci_low" else 1]
            row.append("" if v is None else v)
        rows.append(row)
    return _write_csv(path, CSV_COLUMNS, rows)


def _write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV file atomically (never half a table)."""
    path = Path(path)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return path


def write_mean_csv(recs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write :func:`aggregate` (mean and spread over seeds) to ``path``."""
    return _write_csv(path, MEAN_CSV_COLUMNS,
                      [["" if a.get(c) is None else a[c] for c in MEAN_CSV_COLUMNS] for a in aggregate(recs)])


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 100 else str(n)


def _upstream_label(r: dict[str, Any]) -> str:
    return f"{r['upstream']} ({_fmt_params(r['upstream_params'])})" if r["upstream_params"] else r["upstream"]


def largest_fraction(recs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frozen records at the largest label fraction probed for their task."""
    frozen = [r for r in recs if r.get("mode", "frozen") == "frozen"]
    top: dict[str, float] = {}
    for r in frozen:
        top[r["task"]] = max(top.get(r["task"], 0.0), float(r.get("label_fraction", 1.0)))
    return [r for r in frozen if abs(float(r.get("label_fraction", 1.0)) - top[r["task"]]) < 1e-9]


def _mean_and_interval(rs: Sequence[dict[str, Any]]) -> tuple[float, float | None, float | None]:
    """Mean test accuracy (%) of records (seeds) and the mean of their interval bounds (or None)."""
    m = 100 * sum(r["test_acc"] for r in rs) / len(rs)
    cis = [test_interval(r) for r in rs]
    if any(c is None for c in cis):
        return m, None, None
    return m, 100 * sum(c[0] for c in cis) / len(cis), 100 * sum(c[1] for c in cis) / len(cis)


def _errorbar(ax: Any, xs: Sequence[Any], points: Sequence[tuple[float, float | None, float | None]],
              **kw: Any) -> None:
    """Plot means with asymmetric interval bars where every point has an interval."""
    ys = [p[0] for p in points]
    if all(p[1] is not None for p in points):
        yerr = [[max(0.0, y - p[1]) for y, p in zip(ys, points)], [max(0.0, p[2] - y) for y, p in zip(ys, points)]]
        ax.errorbar(xs, ys, yerr=yerr, capsize=3, elinewidth=1, **kw)
    else:
        ax.plot(xs, ys, **kw)


def plot_layers(recs: Sequence[dict[str, Any]], path: str | os.PathLike,
                label_fraction: float | None = 1.0) -> Path | None:
    """Accuracy vs layer, one panel per (task, head): the AALBERT paper's probing figure.

    One line per upstream over its integer layers; the weighted sum as a star right of the
    last layer; single-state upstreams (fbank / log-mel baselines) as horizontal lines.
    Only frozen probes at ``label_fraction`` (``None``: each task at the largest fraction
    probed, see :func:`largest_fraction`); with several seeds the mean is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if label_fraction is None:
        sel = largest_fraction(recs)
    else:
        sel = [r for r in recs if r["mode"] == "frozen" and abs(r["label_fraction"] - label_fraction) < 1e-9]
    panels = sorted({(r["task"], r["head"]) for r in sel}, key=lambda th: (th[0], ["linear", "mlp1", "mlp2"].index(th[1])
                                                                            if th[1] in ("linear", "mlp1", "mlp2") else 9))
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    max_layer = max([r["num_hidden_states"] - 1 for r in sel] + [1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ups = sorted({r["upstream"] for r in sel})
    color_of = {u: colors[i % len(colors)] for i, u in enumerate(ups)}
    for ax, (task, head) in zip(axes.flat, panels):
        group: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
        nhs: dict[str, int] = {}
        labels: dict[str, str] = {}
        for r in sel:
            if (r["task"], r["head"]) != (task, head):
                continue
            layer = r["layer"]
            if layer == "last":
                layer = r["num_hidden_states"] - 1
            group[r["upstream"]][layer].append(r)
            nhs[r["upstream"]] = r["num_hidden_states"]
            labels[r["upstream"]] = _upstream_label(r)
        for up, by_layer in sorted(group.items()):
            c = color_of[up]
            ints = sorted(k for k in by_layer if isinstance(k, int))
            mean = {k: _mean_and_interval(v) for k, v in by_layer.items()}
            if nhs[up] == 1 and ints:
                m, lo, hi = mean[ints[0]]
                ax.axhline(m, color=c, ls="--", lw=1.5, label=f"{labels[up]}")
                if lo is not None:
                    ax.axhspan(lo, hi, color=c, alpha=0.12, lw=0)
            elif ints:
                _errorbar(ax, ints, [mean[k] for k in ints], color=c, marker="o", label=labels[up])
            if "weighted" in mean:
                _errorbar(ax, [max_layer + 0.6], [mean["weighted"]], color=c, marker="*", ms=13, ls="none",
                          label=f"{up} weighted sum")
        ax.set_title(f"{task} / {head} head (bars, bands: 95 % intervals)")
        ax.set_xlabel("layer (0 = embedding output; w = weighted sum)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(list(range(max_layer + 1)) + [max_layer + 0.6],
                      [str(k) for k in range(max_layer + 1)] + ["w"])
        ax.set_xlim(-0.4, max_layer + 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fracs = sorted({(r["task"], float(r["label_fraction"])) for r in sel})
    labels = ", ".join(f"{t} {100 * f:g} %" for t, f in fracs) if label_fraction is None else f"{100 * label_fraction:g} %"
    fig.suptitle(f"Probing accuracy per layer (frozen upstream; training labels used: {labels})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_label_fractions(recs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Test accuracy vs label fraction (log x), one panel per (task, head).

    Per upstream and mode, two lines at most: the layer with the best valid accuracy at the
    largest fraction (the layer a practitioner would pick) and the weighted sum.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts: dict[tuple, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        pts[(r["task"], r["head"], r["upstream"], r["mode"], str(r["layer"]))][r["label_fraction"]].append(r)
    pts = {k: v for k, v in pts.items() if len(v) >= 2}
    if not pts:
        return None
    chosen: dict[tuple, list[str]] = defaultdict(list)
    for (task, head, up, mode, layer), by_frac in pts.items():
        if layer == "weighted":
            chosen[(task, head, up, mode)].append(layer)
    best: dict[tuple, tuple[float, str]] = {}
    for (task, head, up, mode, layer), by_frac in pts.items():
        if layer == "weighted":
            continue
        top = by_frac[max(by_frac)]
        v = sum(r["valid_acc"] for r in top) / len(top)
        key = (task, head, up, mode)
        if key not in best or v > best[key][0]:
            best[key] = (v, layer)
    for key, (_, layer) in best.items():
        chosen[key].insert(0, layer)
    panels = sorted({(k[0], k[1]) for k in chosen})
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (task, head) in zip(axes.flat, panels):
        for (t, h, up, mode), layers in sorted(chosen.items()):
            if (t, h) != (task, head):
                continue
            for layer in layers:
                by_frac = pts[(t, h, up, mode, layer)]
                xs = sorted(by_frac)
                name = "weighted sum" if layer == "weighted" else f"layer {layer}"
                _errorbar(ax, xs, [_mean_and_interval(by_frac[x]) for x in xs],
                          marker="*" if layer == "weighted" else "o", ls="--" if layer == "weighted" else "-",
                          label=f"{up} {name}{' (fine-tuned)' if mode == 'finetune' else ''}")
        ax.set_xscale("log")
        ax.set_title(f"{task} / {head} head")
        ax.set_xlabel("fraction of training labels")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Accuracy vs amount of labelled data (best layer on valid, and the weighted sum; "
                 "bars: 95 % intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_weights(recs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Heatmap of the learned weighted-sum weights: one row per probe, one column per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sel = [r for r in sort_records(recs) if r.get("weights")]
    if not sel:
        return None
    n_layers = max(len(r["weights"]) for r in sel)
    mat = np.full((len(sel), n_layers), np.nan)
    for i, r in enumerate(sel):
        mat[i, : len(r["weights"])] = r["weights"]
    fig, ax = plt.subplots(figsize=(2.5 + 0.75 * n_layers + 2.5, 1.2 + 0.38 * len(sel)))
    im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0.0, vmax=float(np.nanmax(mat)))
    for i in range(len(sel)):
        for j in range(n_layers):
            if not np.isnan(mat[i, j]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < 0.6 * np.nanmax(mat) else "black")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("hidden state (0 = embedding output)")
    ax.set_yticks(range(len(sel)))
    ax.set_yticklabels([f"{r['upstream']} {r['task']}/{r['head']} frac {r['label_fraction']:g}"
                        f"{' ft' if r['mode'] == 'finetune' else ''}" for r in sel], fontsize=7)
    ax.set_title(f"Learned weighted-sum weights (softmax; uniform start = {1 / n_layers:.2f})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def summarize(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``results.csv`` and the plots into ``out_dir``; return the table and paths.

    Returns:
        ``{"table": str, "csv": path, "plots": {"layers": path|None, "label_fraction": ..., "weights": ...},
        "records": [...]}``.

    Raises:
        FileNotFoundError: no ``results.jsonl`` with records in ``out_dir``.
    """
    out = Path(out_dir)
    recs = load_records(out)
    if not recs:
        raise FileNotFoundError(f"{results_path(out)}: no probe results (run `aviary probe --out {out}` first)")
    plots: dict[str, Path | None] = {}
    fractions = sorted({r["label_fraction"] for r in recs if r["mode"] == "frozen"})
    main_fraction = 1.0 if 1.0 in fractions else (fractions[-1] if fractions else 1.0)
    plots["layers"] = plot_layers(recs, out / "accuracy_vs_layer.png", main_fraction)
    plots["label_fraction"] = plot_label_fractions(recs, out / "accuracy_vs_label_fraction.png")
    plots["weights"] = plot_weights(recs, out / "weighted_sum_weights.png")
    csv_path = write_csv(recs, out / "results.csv")
    mean_csv = write_mean_csv(recs, out / "results_mean.csv")
    return {"table": format_table(recs), "csv": str(csv_path), "mean_csv": str(mean_csv),
            "plots": {k: (str(v) if v else None) for k, v in plots.items()}, "records": recs}
