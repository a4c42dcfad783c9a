"""Sweeps: many probes of one upstream in one process, one progress bar, resumable.

    from aviary.evaluate import run_sweep
    records = run_sweep("runs/aalbert-3l", "corpus/", "probes/", tasks=["phone", "speaker"],
                        heads=["linear", "mlp1"], layers="all,weighted")
    # or, the same: run_sweep(..., plan=SweepPlan(tasks=..., heads=..., layers=...))

Frozen sweeps extract the upstream once into ``OUT/cache/<name>-<fingerprint>/`` (or use
the cache passed in) and train every probe from it. Finished probes are skipped by
``key`` (see :func:`aviary.evaluate.probe.probe_key`), so an interrupted sweep picks up
where it stopped without duplicating a record.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from aviary.evaluate.cache import FeatureCache, extract_to_cache, open_cache
from aviary.evaluate.featurizers import parse_layer_spec
from aviary.evaluate.probe import ChosenLR, ProbeConfig, UninformativeFeatures, probe_key, run_probe, upgrade_legacy
from aviary.precision import resolve_precision
from aviary.evaluate.results import append_record, done_keys, load_records
from aviary.evaluate.tasks import get_task, load_splits
from aviary.evaluate.upstreams import FEATURE_BASELINES, RANDOM_PREFIX, describe_upstream, resolve_upstream
from aviary.models.upstream import Upstream
from aviary.train.compile import compile_model
from aviary.data import load_manifest
from aviary.data.check import usable_utterances
from aviary.data.manifest import check_disjoint_splits, manifest_path

log = logging.getLogger(__name__)


def expand_layers(spec: str | Sequence[Any], num_hidden_states: int) -> list[int | str]:
    """``"all"`` -> every int layer; ``"all,weighted"``, ``"0,3,last"``, ``["weighted", 2]`` ...

    Returns:
        Layer specs in order, duplicates removed (``"last"`` stays ``"last"``).
    """
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[int | str] = []
    for it in items:
        if isinstance(it, str) and it.strip().lower() == "all":
            new: list[int | str] = list(range(num_hidden_states))
        else:
            new = [parse_layer_spec(it, num_hidden_states)]
        out += [x for x in new if x not in out]
    if not out:
        raise ValueError(f"--layers {spec!r} selects nothing")
    return out


def display_name(spec: str) -> str:
    """Name recorded for an ``--upstream`` string: baselines as is, run dirs by their folder name."""
    if spec in FEATURE_BASELINES or spec.startswith(RANDOM_PREFIX) or spec.startswith("s3prl:"):
        return spec
    p = Path(spec)
    if p.is_file():
        p = p.parent
    return p.resolve().name or spec


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "upstream"


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep runs: the grid of probes, and how (device, cache, progress).

    Every combination of task x label fraction x head x layer x seed is one probe.
    """

    tasks: Sequence[str] = ("phone",)
    heads: Sequence[str] = ("linear",)
    layers: str | Sequence[Any] = "all"  # as in expand_layers
    label_fractions: Sequence[float] = (1.0,)
    seeds: Sequence[int] = (0,)
    finetune: bool = False  # each probe starts from a fresh copy of the upstream
    cache: str | os.PathLike | None = None  # an existing `aviary extract` cache (validated)
    name: str | None = None  # display name (required with an Upstream object)
    overrides: dict[str, Any] | None = None  # other ProbeConfig fields (lr, hidden, steps, precision ...)
    extract: dict[str, Any] | None = None  # keyword arguments of extract_to_cache (dtype, precision ...)
    device: str = "cpu"
    progress: bool = True
    random_seed: int = 0  # initialisation seed of random:PRESET
    # Leave out utterances whose audio does not load (counted per split in each record as
    # skipped_files) instead of stopping at the first.
    skip_bad: bool = False
    compile: bool = False  # --compile: torch.compile the upstream's blocks (fine-tuning copies stay compiled)

    def probe_configs(self, num_hidden_states: int) -> list[ProbeConfig]:
        """One :class:`ProbeConfig` per probe of the grid, in the order they run."""
        overrides = upgrade_legacy(dict(self.overrides or {}))
        layer_list = expand_layers(self.layers, num_hidden_states)
        return [ProbeConfig(**{**overrides, "task": t, "head": h, "layer": str(layer), "label_fraction": f,
                               "seed": s, "finetune": self.finetune})
                for t in self.tasks for f in self.label_fractions for h in self.heads for layer in layer_list
                for s in self.seeds]


def run_sweep(upstream: str | Upstream | None, data: str | os.PathLike, out: str | os.PathLike,
              plan: SweepPlan | None = None, **fields: Any) -> list[dict[str, Any]]:
    """Run every probe of ``plan`` not yet recorded in ``out``; append the records.

    Args:
        upstream: ``--upstream`` string (run dir, ``fbank``, ``logmel``, ``logmel+delta``,
            ``random:PRESET``), an :class:`Upstream` object (then give ``name``), or ``None``
            with ``cache`` (frozen probing from an existing cache alone).
        data: corpus directory or manifest file.
        out: results directory (``results.jsonl`` and, by default, the feature cache).
        plan: the :class:`SweepPlan`; or give its fields as keywords (``tasks=["phone"], ...``).

    Returns:
        The records written by this call (already-recorded probes are not repeated).
    """
    if plan is not None and fields:
        raise TypeError(f"run_sweep: give a plan or its fields, not both ({sorted(fields)})")
    plan = plan or SweepPlan(**fields)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for t in plan.tasks:
        get_task(t)
    up_obj, info, name = _open_upstream(upstream, plan)
    todo = _pending(out, name, plan.probe_configs(int(info["num_hidden_states"])))
    if not todo:
        return []
    requested = todo[0].precision
    log.info("%s: %d probes in precision %s (requested %s)", name, len(todo),
             resolve_precision(requested, plan.device if plan.finetune else "cpu"), requested)
    splits = {t: load_splits(data, t) for t in sorted({c.task for c in todo})}
    skipped_counts: dict[str, dict[str, int]] = {}
    if plan.skip_bad:
        splits, skipped_counts = _drop_unusable(splits, data)
    all_utts = {u.id: u for parts in splits.values() for utts in parts.values() for u in utts}
    feature_cache = None if plan.finetune else _feature_cache(plan, out, up_obj, info, name, todo,
                                                              list(all_utts.values()))
    return _run_probes(plan, out, todo, splits, skipped_counts, up_obj, info, name, feature_cache)


def _open_upstream(upstream: str | Upstream | None, plan: SweepPlan
                   ) -> tuple[Upstream | None, dict[str, Any], str]:
    """The upstream (a string to resolve, an object, or just the cache's description),
    its recorded description and its display name."""
    name = plan.name
    up_obj: Upstream | None = None
    if isinstance(upstream, str):
        up_obj, resolved = resolve_upstream(upstream, device=plan.device, seed=plan.random_seed)
        name = name or (display_name(upstream) if resolved == upstream else resolved)
    elif upstream is not None:
        up_obj = upstream
        if name is None:
            raise ValueError("run_sweep: pass name=... with an Upstream object")
    if up_obj is not None:
        compile_model(up_obj, plan.compile)
        frame_tasks = [t for t in plan.tasks if get_task(t).level == "frame"]
        if frame_tasks and getattr(up_obj, "utterance_level_only", False):
            # e.g. SSAST patch models: a token covers 16 frames x 16 mel bins, not a time step.
            raise ValueError(f"{name}: its tokens are not frames, so frame-level task(s) {frame_tasks} "
                             "cannot be probed; use an utterance-level task (speaker, keyword)")
        return up_obj, describe_upstream(up_obj, name).to_dict(), name
    if plan.cache is not None:
        info = FeatureCache(plan.cache).upstream
        return None, info, info["name"]
    raise ValueError("run_sweep needs an upstream or a cache")


def _pending(out: Path, name: str, configs: list[ProbeConfig]) -> list[ProbeConfig]:
    """The probes of ``configs`` that ``out/results.jsonl`` does not hold yet."""
    # Records of the epoch-based trainer (before solved probes and intervals: no "test_ci")
    # do not count as done: such a probe is fitted again and its new record replaces the old.
    done = done_keys(out, require="test_ci")
    todo = [c for c in configs if probe_key(name, c) not in done]
    if len(todo) < len(configs):
        log.info("%s: %d of %d probes already recorded, skipping them", out, len(configs) - len(todo), len(configs))
    return todo


def _feature_cache(plan: SweepPlan, out: Path, up_obj: Upstream | None, info: dict[str, Any], name: str,
                   todo: list[ProbeConfig], utts: list[Any]) -> FeatureCache:
    """The frozen probes' features: the cache given, the sweep's own, or a fresh extraction."""
    if plan.cache is not None:
        return open_cache(plan.cache, utterances=utts, upstream=info if up_obj is not None else None)
    if up_obj is None:
        raise ValueError("frozen probing without a cache needs an upstream")
    nhs = int(info["num_hidden_states"])
    cache_dir = out / "cache" / f"{_safe(name)}-{info['fingerprint']}"
    if not (cache_dir / "index.json").is_file():
        # Extract every layer once: later sweeps over other layers reuse the cache.
        extract_to_cache(up_obj, utts, cache_dir, name=name, layers="all", progress=plan.progress,
                         info=describe_upstream(up_obj, name), **upgrade_legacy(dict(plan.extract or {})))
        return open_cache(cache_dir, utterances=utts, upstream=info)
    cache = open_cache(cache_dir, utterances=utts, upstream=info)
    need = sorted({k for c in todo for k in ([*range(nhs)] if c.layer_value == "weighted" else
                                             [nhs - 1 if c.layer_value == "last" else int(c.layer_value)])})
    missing = [k for k in need if k not in cache.layers]
    if missing:
        raise ValueError(f"{cache_dir}: cached layers {cache.layers} lack {missing}; "
                         f"delete the cache or pass --layers within them")
    return cache


def _run_probes(plan: SweepPlan, out: Path, todo: list[ProbeConfig], splits: dict[str, Any],
                skipped_counts: dict[str, dict[str, int]], up_obj: Upstream | None, info: dict[str, Any],
                name: str, feature_cache: FeatureCache | None) -> list[dict[str, Any]]:
    """Train every pending probe, appending each record as soon as it is done (resumable)."""
    from tqdm.auto import tqdm

    written = []
    refused: list[str] = []
    chosen = _chosen_lrs(out, name) if any(c.lr_per == "sweep" for c in todo) else {}
    bar = tqdm(todo, desc=f"probe {name}", unit="probe", disable=not plan.progress)
    for cfg in bar:
        # Every fine-tuning probe starts from the same pretrained weights.
        up_copy = copy.deepcopy(up_obj) if plan.finetune else None
        group = _lr_group(cfg)
        try:
            rec = run_probe(cfg, splits[cfg.task], cache=feature_cache, upstream=up_copy,
                            upstream_info=info, progress=bar, chosen_lr=chosen.get(group) if group else None)
        except UninformativeFeatures as e:
            log.warning("%s %s %s layer %s: not probed: %s", name, cfg.task, cfg.head, cfg.layer, e)
            refused.append(f"{name} {cfg.task} {cfg.head} layer {cfg.layer}: {e}")
            continue
        if group and group not in chosen and rec.get("lr_trials"):
            chosen[group] = ChosenLR.from_record(rec)
        if plan.skip_bad:
            rec["skipped_files"] = skipped_counts[cfg.task]
        append_record(out, rec)
        written.append(rec)
        log.info("%s %s %s layer %s frac %g: valid %.4f test %.4f (%.1fs)", name, cfg.task, cfg.head,
                 rec["layer"], cfg.label_fraction, rec["valid_acc"], rec["test_acc"], rec["train_seconds"])
        del up_copy
    bar.close()
    if refused and not written:
        # Nothing measured: an error, not an empty success (with other probes done, the
        # warnings above name the ones left out).
        raise UninformativeFeatures(f"{len(refused)} of {len(todo)} probes not run; {refused[0]}")
    return written


def _lr_group(cfg: ProbeConfig) -> str | None:
    """The probes that share one lr choice under ``lr_per="sweep"`` (None: not shared): those
    whose settings differ in the layer only, i.e. in a sweep the same task, head, label fraction
    and seed (precision is not part of a probe's identity either)."""
    if cfg.lr_per != "sweep" or cfg.lr is not None:
        return None
    c = cfg.to_dict()
    for k in ("layer", "precision"):
        c.pop(k)
    return json.dumps(c, sort_keys=True)


def _chosen_lrs(out: Path, name: str) -> dict[str, ChosenLR]:
    """Choices already made by the records in ``out`` (a resumed ``lr_per="sweep"`` sweep)."""
    chosen: dict[str, ChosenLR] = {}
    for rec in load_records(out):
        if rec.get("upstream") != name or not rec.get("lr_trials") or not isinstance(rec.get("config"), dict):
            continue
        try:
            cfg = ProbeConfig.from_dict(upgrade_legacy(dict(rec["config"])))
        except ValueError:  # a record of another version's settings: not a choice to reuse
            continue
        group = _lr_group(cfg)
        if group and group not in chosen:
            chosen[group] = ChosenLR.from_record(rec)
    return chosen


def _drop_unusable(splits: dict[str, dict[str, list[Any]]], data: Any
                   ) -> tuple[dict[str, dict[str, list[Any]]], dict[str, dict[str, int]]]:
    """``--skip-bad``: each task's splits without the utterances whose audio does not load."""
    verdict: dict[str, bool] = {}
    out, counts = {}, {}
    for task, parts in splits.items():
        todo = [u for utts in parts.values() for u in utts if u.id not in verdict]
        kept, _ = usable_utterances(todo)
        verdict.update({u.id: False for u in todo})
        verdict.update({u.id: True for u in kept})
        out[task] = {name: [u for u in utts if verdict[u.id]] for name, utts in parts.items()}
        counts[task] = {name: len(parts[name]) - len(out[task][name]) for name in parts}
        for name, utts in out[task].items():
            if not utts:
                raise ValueError(f"{data}: every file of split {name!r} of task {task!r} is unusable")
    return out, counts


def run_extract(checkpoint: str, data: str | os.PathLike, out: str | os.PathLike, *, layers: str = "all",
                dtype: str = "float16", split: str | None = None, device: str = "cpu",
                random_seed: int = 0, name: str | None = None, skip_bad: bool = False, compile: bool = False,
                **kwargs: Any):
    """``aviary extract``: resolve the upstream, load the corpus (or one split), fill the cache.

    Returns:
        :class:`~aviary.evaluate.cache.ExtractStats`.
    """
    up, resolved = resolve_upstream(checkpoint, device=device, seed=random_seed)
    compile_model(up, compile)
    name = name or (display_name(checkpoint) if resolved == checkpoint else resolved)
    utts = load_manifest(data, split=split)
    if not utts:
        raise ValueError(f"{manifest_path(data, split)}: no utterances to extract (the manifest is empty)")
    check_disjoint_splits(data)  # a cache of overlapping splits would feed inflated probes
    skipped: list[tuple[str, str]] = []
    if skip_bad:
        utts, skipped = usable_utterances(utts, int(getattr(up, "sample_rate", 16000)))
        if not utts:
            raise ValueError(f"{data}: every file is unusable ({skipped[0][1]}, ...)")
    return extract_to_cache(up, utts, out, name=name, layers=layers, dtype=dtype, skipped=skipped, **kwargs)
