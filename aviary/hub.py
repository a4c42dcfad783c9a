"""Checkpoints in, upstreams out: :func:`load`, :func:`describe` (``aviary info``), :func:`save_bundle`.

The layer above ``models/`` and ``interop/``: it reads aviary's own weights files (format:
:mod:`aviary.storage`; run directories: :mod:`aviary.train.checkpoint`) and other toolkits'
checkpoints (through :mod:`aviary.interop`), and builds the model from the config stored in
the file alone (:func:`aviary.models.registry.build_upstream_from_config`)::

    model = aviary.load("runs/aalbert-3l")            # run dir, bundle file, or "s3prl:CKPT"
    hidden_states, lengths = model.extract(wavs, wav_lengths)

A *bundle* is one ``.safetensors`` file: the pretraining model's tensors plus, in the
safetensors metadata, ``aviary.format_version``, ``aviary.sha256`` and ``aviary.config``
(:func:`aviary.storage.checkpoint_config`). A run directory's ``model.safetensors`` is such a
bundle, so :func:`load` needs nothing else. Format versions only go up; every older version
keeps loading, which ``tests/interop/test_format.py`` checks against a checked-in checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from aviary import storage
from aviary.config import Config
from aviary.interop.s3prl import load_s3prl_upstream, read_s3prl_checkpoint
from aviary.models.registry import build_upstream_from_config, count_parameters, get_preset, list_presets
from aviary.models.upstream import UPSTREAM_PREFIX, Upstream, upstream_state
from aviary.storage import CheckpointError
from aviary.train.checkpoint import RUN_JSON, find_weights

log = logging.getLogger(__name__)

S3PRL_PREFIX = "s3prl:"


def load(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> Upstream:
    """Load a pretrained upstream.

    Args:
        path: a run directory (its ``model.safetensors`` or newest checkpoint), a
            single-file bundle (``.safetensors`` with the config in its metadata), or
            ``"s3prl:CKPT"`` to import an s3prl Mockingjay / TERA / AALBERT checkpoint.
        device: where to put the model.

    Returns:
        The :class:`~aviary.models.upstream.Upstream` in eval mode, with ``checkpoint_path``
        and ``checkpoint_meta`` (the stored config) set.

    Raises:
        CheckpointError: unreadable, corrupted or refused (pickle) files, naming the file.
    """
    spath = str(path)
    if spath.startswith(S3PRL_PREFIX):
        return load_s3prl_upstream(spath[len(S3PRL_PREFIX):], **kwargs).to(device).eval()
    wpath = find_weights(spath)
    if storage.torch_file_kind(wpath) is not None:
        # A torch.save zip or a raw pickle: another toolkit's file, never unpickled here.
        raise CheckpointError(f"{wpath}: a torch/pickle file, not an aviary safetensors checkpoint; "
                              f"for s3prl checkpoints use aviary.load('s3prl:{wpath}') or `aviary import s3prl`")
    tensors, meta = storage.load_tensors(wpath)
    stored = storage.load_config_from_metadata(wpath, meta)
    _cfg, upstream = build_upstream_from_config(stored, source=wpath)
    missing, unexpected = upstream.load_state_dict(upstream_state(tensors), strict=False)
    if missing:
        raise CheckpointError(f"{wpath}: weights missing for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if unexpected and not any(k.startswith(UPSTREAM_PREFIX) for k in tensors):
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", wpath, len(unexpected), unexpected[:3])
    upstream.checkpoint_path = str(wpath)
    upstream.checkpoint_meta = stored
    return upstream.to(device).eval()


def save_bundle(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], model_config: Config | Mapping[str, Any],
                *, step: int | None = None, train: Config | Mapping[str, Any] | None = None,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Write a single-file bundle that :func:`load` and ``aviary info`` understand.

    Args:
        path: destination ``.safetensors`` file (written atomically).
        tensors: the pretraining model's state dict (or an upstream's own state dict).
        model_config: the pretraining config (with its ``family`` field).
        step: optimizer updates done, if known.
        train: the train config, if any.
        extra: further JSON-able entries for the stored config (e.g. ``source``).

    Returns:
        ``path``.
    """
    path = Path(path)
    storage.save_tensors(path, tensors, config=storage.checkpoint_config(model_config, train, step, **(extra or {})))
    return path


def _leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def match_preset(model_config: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The registered preset a model config equals, or the closest one.

    Returns:
        ``(name, differing keys)``: ``(name, [])`` for an exact match, the closest preset of
        the same family and its differing dotted keys otherwise, ``(None, [])`` when the
        family has no presets.
    """
    mine = _leaves(model_config)
    best: tuple[str | None, list[str]] = (None, [])
    for name in list_presets():
        try:
            theirs = _leaves(get_preset(name).to_dict())
        except Exception as e:  # a broken preset must not break `aviary info`
            log.debug("preset %s: %s", name, e)
            continue
        if theirs.get("family") != mine.get("family"):
            continue
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if not diff:
            return name, []
        if best[0] is None or len(diff) < len(best[1]):
            best = (name, diff)
    return best


def _describe_frontend(fe: Mapping[str, Any]) -> str:
    kind = fe.get("kind", "?")
    sr = fe.get("sample_rate", 16000)
    if kind == "linear":
        dims = f"{fe.get('n_fft', 400) // 2 + 1} linear bins"
    else:
        dims = f"{fe.get('n_mels')} {'mel' if kind == 'logmel' else 'fbank'} bins"
    parts = [f"{kind}: {dims}"]
    if fe.get("delta_order"):
        parts.append(f"+{'delta' if fe['delta_order'] == 1 else 'delta+delta-delta'}")
    parts.append(f"{1000 * fe.get('win_length', 400) / sr:g} ms / {1000 * fe.get('hop_length', 160) / sr:g} ms")
    if fe.get("cmvn", "none") != "none":
        parts.append(f"CMVN {fe['cmvn']}")
    if fe.get("normalize_db") is not None:
        parts.append(f"waveform at {fe['normalize_db']:g} dB")
    return ", ".join(parts) + f" ({sr} Hz)"


def _frontends(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Descriptions of every front-end config found in a model config (``input``, ``target``...)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v.get("kind") in ("logmel", "linear", "fbank"):
            out[k] = _describe_frontend(v)
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint is: model, preset, parameters, front-end, training steps, corpus.

    Args:
        path: a run directory, a bundle file, or ``s3prl:CKPT`` (a torch-saved s3prl
            checkpoint file is also recognised without the prefix).

    Returns:
        A JSON-able dict (see :func:`format_description`).

    Raises:
        CheckpointError / S3prlError: unreadable, corrupted or refused files, naming the file.
    """
    spath = str(path)
    source_kind = "aviary"
    if spath.startswith(S3PRL_PREFIX) or storage.torch_file_kind(spath) == "zip":
        # torch.save's zip container: another toolkit's checkpoint.
        file = Path(spath[len(S3PRL_PREFIX):] if spath.startswith(S3PRL_PREFIX) else spath)
        s3cfg, tensors, info = read_s3prl_checkpoint(file)
        stored = {"model": s3cfg.to_dict(), "step": info["step"], "source": info["source"]}
        weights, version, run_json = file, None, {"data": info["data"]}
        source_kind = "s3prl"
    else:
        weights = find_weights(spath)
        tensors, meta = storage.load_tensors(weights)
        stored = storage.load_config_from_metadata(weights, meta)
        version = storage.format_version(weights, meta)
        run_json = {}
        for cand in (weights.parent / RUN_JSON, weights.parent.parent.parent / RUN_JSON):
            if cand.is_file():
                try:
                    run_json = storage.read_json(cand)
                except CheckpointError as e:
                    log.warning("%s", e)
                break
    model_cfg = stored.get("model", stored)
    cfg, upstream = build_upstream_from_config(stored, source=weights)
    preset, diff = match_preset(model_cfg)
    train = stored.get("train") or run_json.get("train") or {}
    d: dict[str, Any] = {
        "path": spath,
        "weights": str(weights),
        "format": source_kind,
        "format_version": version,
        "family": cfg.family,
        "variant": model_cfg.get("variant"),
        "preset": preset if not diff else None,
        "closest_preset": preset if diff else None,
        "differs_from_preset": diff,
        "parameters_upstream": count_parameters(upstream),
        "tensors_in_file": int(sum(t.numel() for t in tensors.values())),
        "hidden_size": getattr(upstream, "hidden_size", None),
        "num_hidden_states": getattr(upstream, "num_hidden_states", None),
        "frame_shift_ms": round(1000 * float(getattr(upstream, "frame_shift", 0.0)), 3),
        "frontends": _frontends(model_cfg),
        "encoder": model_cfg.get("encoder"),
        "step": stored.get("step"),
        "train_steps": train.get("steps") if isinstance(train, Mapping) else None,
        "data": run_json.get("data") or stored.get("data"),
        "source": stored.get("source"),
        "git_commit": run_json.get("git_commit"),
    }
    return d


def _checksum_note(version: int | None) -> str:
    if version is None:
        return " (plain safetensors, no aviary checksum)"
    if version < 2:
        # Format 1's checksum covers the tensors, not the config stored beside them.
        return f" (aviary format version {version}, checksum of the weights verified; the config is not covered)"
    return f" (aviary format version {version}, checksum of weights and config verified)"


def format_description(d: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`describe`'s dict."""
    if d.get("preset"):
        preset = d["preset"]
    elif d.get("closest_preset"):
        keys = d["differs_from_preset"]
        preset = (f"custom (closest: {d['closest_preset']}; {len(keys)} setting(s) differ: "
                  f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''})")
    else:
        preset = "custom"
    lines = [
        f"checkpoint   {d['weights']}",
        f"format       {d['format']}" + (_checksum_note(d.get("format_version"))
                                          if d["format"] == "aviary" else " (imported on the fly, read with weights_only)"),
        f"model        {d['family']}" + (f" / {d['variant']}" if d.get("variant") else ""),
        f"preset       {preset}",
        f"parameters   {d['parameters_upstream']:,} (upstream); {d['tensors_in_file']:,} values in the file",
        f"output       {d['num_hidden_states']} hidden states of size {d['hidden_size']}, one every {d['frame_shift_ms']:g} ms",
    ]
    enc = d.get("encoder")
    if isinstance(enc, Mapping):
        # Only the facts the family's encoder config states (SSAST has patches, not R or pre_ln).
        facts = [f"{enc.get('num_heads')} heads", f"FFN {enc.get('ffn_size')}"]
        if "downsample" in enc:
            facts.append(f"R={enc['downsample']}")
        if "pre_ln" in enc:
            facts.append(f"{'pre' if enc['pre_ln'] else 'post'}-LN")
        if "patch_freq" in enc:
            facts.append(f"{enc['patch_freq']}x{enc.get('patch_time')} patches, pre-LN")
        lines.append(f"encoder      {enc.get('num_layers')} layers{' (shared)' if enc.get('share_layers') else ''}, "
                     + ", ".join(facts))
    for name, desc in (d.get("frontends") or {}).items():
        lines.append(f"{name:<12} {desc}")
    steps = d.get("step")
    total = d.get("train_steps")
    lines.append(f"trained      {steps if steps is not None else 'unknown'} steps"
                 + (f" of {total}" if total else ""))
    lines.append(f"corpus       {d.get('data') or 'unknown'}")
    src = d.get("source")
    if isinstance(src, Mapping):
        lines.append(f"imported     from {src.get('toolkit')}: {src.get('path')}")
    if d.get("git_commit"):
        lines.append(f"git commit   {d['git_commit']}")
    return "\n".join(lines)
