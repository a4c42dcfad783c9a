"""Run-directory training checkpoints: ``checkpoints/step-NNNNNNNN/`` written whole or not at all.

The file format (safetensors + checksums, atomic writes, JSON helpers) is :mod:`aviary.storage`;
this module only knows the layout of a run directory and the loop's trainer state.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from aviary.config import Config
from aviary.storage import (FORMAT_VERSION, CheckpointError, atomic_dir, checkpoint_config, json_checksum,
                            load_config_from_metadata, load_tensors, read_json, read_metadata, save_tensors,
                            verify_metadata, write_json_atomic)

log = logging.getLogger(__name__)


def optimizer_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a ``torch.optim`` state_dict into tensors (for safetensors) and JSON.

    Returns:
        (tensors named ``optim.<param_idx>.<key>``, JSON-able dict with param_groups and
        non-tensor per-parameter values).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: Mapping[str, torch.Tensor], js: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_tensors`: rebuild a state_dict for ``load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, d in js.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    return {"state": state, "param_groups": js["param_groups"]}


# Run directories: checkpoints/step-NNNNNNNN/{model,trainer}.safetensors + trainer.json.
#
# A checkpoint directory is first written in full under a hidden temporary name and then
# renamed to ``step-NNNNNNNN``: a directory with that name is therefore always complete
# (each file is also atomic and checksummed, which catches later truncation or bit rot).

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
RUN_JSON = "run.json"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``RUN_DIR/checkpoints/step-00001000`` for ``step=1000``."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every checkpoint directory of a run, newest first."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for d in root.glob("step-*"):
            suffix = d.name[len("step-"):]
            if d.is_dir() and suffix.isdigit():
                out.append((int(suffix), d))
    return sorted(out, reverse=True)


def find_weights(path: str | os.PathLike) -> Path:
    """The weights file behind ``path``: the file itself, a run directory's ``model.safetensors``,
    or else its newest ``checkpoints/step-*/model.safetensors``.

    Raises:
        CheckpointError: a directory with neither; FileNotFoundError: no such path.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        ckdir = path / CHECKPOINTS
        steps = sorted(ckdir.glob(f"step-*/{MODEL_FILE}"), reverse=True) if ckdir.is_dir() else []
        if steps:
            return steps[0]
        raise CheckpointError(f"{path}: no {MODEL_FILE} and no {CHECKPOINTS}/step-*/{MODEL_FILE}")
    raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")


def refuse_existing_model(out_dir: str | os.PathLike) -> None:
    """Raise FileExistsError when ``out_dir`` already holds an aviary model (bundle or checkpoints)."""
    out = Path(out_dir)
    if (out / MODEL_FILE).exists() or list_checkpoints(out):
        raise FileExistsError(f"{out} already holds an aviary model; choose another --out")


def write_imported_run(out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], model_config: Config,
                       *, step: int | None, source: Mapping[str, Any], data: str | None = None) -> Path:
    """Write a run directory for a model imported from another toolkit (``aviary import``).

    ``RUN_DIR/model.safetensors`` (the pretraining model, config in its metadata, so
    :func:`aviary.load` takes the directory) and ``RUN_DIR/run.json``.

    Args:
        out_dir: the run directory; it must not hold an aviary model yet.
        tensors: the pretraining model's state dict.
        model_config: its config.
        step: the other toolkit's training step, if known.
        source: ``{"toolkit", "path", ...}``: where the model came from.
        data: the corpus it was trained on, if known.

    Returns:
        The weights file.

    Raises:
        FileExistsError: ``out_dir`` holds a model already.
    """
    out = Path(out_dir)
    refuse_existing_model(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / MODEL_FILE
    save_tensors(weights, tensors, config=checkpoint_config(model_config, None, step, source=source))
    write_json_atomic(out / RUN_JSON, {"model": model_config.to_dict(), "train": None, "data": data,
                                       "source": source, "step": step, "format_version": FORMAT_VERSION})
    return weights


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_tensors: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any], trainer_tensors: Mapping[str, torch.Tensor],
                    trainer_state: Mapping[str, Any], keep_last: int | None = None) -> Path:
    """Write one complete training checkpoint of a run, atomically, then prune old ones.

    Args:
        run_dir: the run directory.
        step: number of optimizer updates done; names the directory.
        model_tensors: the pretraining model's state dict.
        config: JSON config stored in the model file's metadata (``{"model", "train", ...}``).
        trainer_tensors: optimizer (and other) tensors.
        trainer_state: JSON-able loop state (step, sampler position, optimizer groups, ...);
            a checksum of it is added so a damaged ``trainer.json`` is detected.
        keep_last: if given, delete all but the newest ``keep_last`` checkpoints afterwards.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: a write failed (e.g. disk full). Earlier checkpoints are untouched and
            the partial directory is removed.
    """
    final = checkpoint_dir(run_dir, step)
    try:
        with atomic_dir(final) as tmp:
            save_tensors(tmp / MODEL_FILE, model_tensors, config=config)
            save_tensors(tmp / TRAINER_FILE, trainer_tensors)
            state = dict(trainer_state)
            state["checksum"] = json_checksum(state)
            write_json_atomic(tmp / TRAINER_JSON, state)
    except (OSError, CheckpointError) as e:
        cause = e.__cause__ if isinstance(e, CheckpointError) else e
        full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        raise CheckpointError(f"could not write checkpoint {final}{' (disk full)' if full else ''}: "
                              f"{cause}; earlier checkpoints are intact") from e
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and any leftover temporary dirs."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    for _step, d in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(d, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    for d in root.glob(".step-*"):
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                         dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify one checkpoint directory.

    Returns:
        (model tensors, model config from the metadata, trainer tensors, trainer state).

    Raises:
        CheckpointError: a file is missing, truncated or fails its checksum.
    """
    d = Path(ckpt_dir)
    model, meta = load_tensors(d / MODEL_FILE)
    config = load_config_from_metadata(d / MODEL_FILE, meta)
    trainer, _ = load_tensors(d / TRAINER_FILE)
    state = read_json(d / TRAINER_JSON)
    if not isinstance(state, dict) or "checksum" not in state:
        raise CheckpointError(f"{d / TRAINER_JSON}: no checksum; not an aviary trainer state")
    stored = state.pop("checksum")
    if json_checksum(state) != stored:
        raise CheckpointError(f"{d / TRAINER_JSON}: checksum mismatch, the file is corrupted")
    return model, config, trainer, state


def latest_good_checkpoint(run_dir: str | os.PathLike):
    """The newest checkpoint of a run that loads and verifies, falling back past bad ones.

    Every damaged checkpoint skipped on the way is reported with a warning naming the file
    and the problem.

    Returns:
        ``(directory, (model tensors, config, trainer tensors, trainer state))``, or ``None``
        when the run has no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them is readable.
    """
    found = list_checkpoints(run_dir)
    errors = []
    for _step, d in found:
        try:
            return d, load_checkpoint(d)
        except CheckpointError as e:
            log.warning("checkpoint %s is unusable, falling back to the previous one: %s", d, e)
            errors.append(str(e))
    if found:
        raise CheckpointError(f"{run_dir}: none of the {len(found)} checkpoints is usable: "
                              + "; ".join(errors))
    return None


def stored_run_config(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``(model file, config)`` of the newest checkpoint whose header verifies, or ``None``.

    Reads only the safetensors header (config and checksums), not the weights: what
    ``--resume`` compares the command line against when ``run.json`` is gone.
    """
    for _step, d in list_checkpoints(run_dir):
        path = d / MODEL_FILE
        try:
            meta = read_metadata(path)
            verify_metadata(path, meta)
            return path, load_config_from_metadata(path, meta)
        except (OSError, ValueError, AttributeError, CheckpointError) as e:
            log.warning("%s: unreadable header (%s); trying the previous checkpoint", path, e)
    return None
