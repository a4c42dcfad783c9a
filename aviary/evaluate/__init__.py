"""Downstream evaluation: feature cache, featurizers, probes, fine-tuning, results.

* :mod:`~aviary.evaluate.cache`: ``aviary extract``, the sharded memory-mapped feature cache.
* :mod:`~aviary.evaluate.featurizers`: one layer, last layer, ELMo-style weighted sum.
* :mod:`~aviary.evaluate.heads`: ``linear``, ``mlp1``, ``mlp2``.
* :mod:`~aviary.evaluate.tasks`: phone (frame level), speaker and keyword (utterance level).
* :mod:`~aviary.evaluate.probe`: one probe, frozen or fine-tuned -> a result record.
* :mod:`~aviary.evaluate.sweep`: many probes in one process, resumable.
* :mod:`~aviary.evaluate.results`: ``results.jsonl``, table, CSV, plots.
* :mod:`~aviary.evaluate.upstreams`: run dirs, ``fbank`` / ``logmel`` baselines, ``random:PRESET``.
"""
from aviary.evaluate.cache import CacheError, FeatureCache, extract_to_cache, open_cache
from aviary.evaluate.featurizers import LayerSelect, WeightedSum, build_featurizer
from aviary.evaluate.heads import build_head
from aviary.evaluate.probe import ProbeConfig, run_probe
from aviary.evaluate.results import load_records, summarize
from aviary.evaluate.sweep import SweepPlan, run_extract, run_sweep
from aviary.evaluate.upstreams import FeatureUpstream, describe_upstream, resolve_upstream

__all__ = [
    "CacheError", "FeatureCache", "extract_to_cache", "open_cache", "LayerSelect", "WeightedSum",
    "build_featurizer", "build_head", "ProbeConfig", "run_probe", "load_records", "summarize",
    "SweepPlan", "run_extract", "run_sweep", "FeatureUpstream", "describe_upstream", "resolve_upstream",
]
