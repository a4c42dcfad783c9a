"""Checkpoint files: safetensors weights + JSON metadata, written atomically, checksummed.

Format (version ``FORMAT_VERSION``):

* A weights file is a plain ``.safetensors`` file. Its string metadata holds
  ``aviary.format_version``, ``aviary.sha256`` (a checksum over every tensor's name, dtype,
  shape and bytes, so truncation or bit rot is detected even where safetensors' own
  header check passes) and ``aviary.config`` (the JSON config needed to rebuild the model).
  Such a file is self-contained: it is the "single-file bundle" :func:`aviary.load` accepts.
  Since format 2, ``aviary.header_sha256`` covers all of that metadata as well (a flipped
  bit in the stored ``num_layers`` would otherwise build a different model).
* JSON sidecars (``*.json``) are written atomically too.

Nothing is ever pickled. Atomic write = write to a temporary file in the same directory,
flush + fsync, ``os.replace`` onto the final name, fsync the directory. A crash at any
point leaves either the old file or the new one, never a mix; a full disk raises
``CheckpointError`` and leaves the previous file untouched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError  # type: ignore[attr-defined]
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped whenever the on-disk layout changes; older versions must keep loading.

1: ``aviary.sha256`` covers the tensors only (a flipped bit in the stored config went unseen).
2: ``aviary.header_sha256`` also covers the whole string metadata: config, format version
   and the tensor checksum.
"""

HEADER_CHECKSUM = "aviary.header_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or cannot be written."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def header_checksum(meta: Mapping[str, str]) -> str:
    """SHA-256 over every metadata entry but :data:`HEADER_CHECKSUM` itself (format 2)."""
    rest = {k: v for k, v in meta.items() if k != HEADER_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync and rename it onto ``path``.

    Raises:
        CheckpointError: if writing fails (e.g. the disk is full); the old file is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise CheckpointError(f"could not write {path}{hint}: {e}; the previous file is intact") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(d: Path) -> None:
    """fsync a directory (or file) so a rename inside it survives a crash; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see module docstring)."""
    with atomic_open(path) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors with checksum and optional JSON ``config``, atomically.

    Args:
        path: destination ``.safetensors`` file.
        tensors: name -> tensor (moved to CPU, made contiguous; shared storage is copied).
        config: JSON-able mapping stored under ``aviary.config`` in the metadata.
        metadata: extra string metadata.
    """
    # clone() breaks shared storage (tied or ALBERT-shared weights), which safetensors refuses.
    cpu = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"aviary.format_version": str(FORMAT_VERSION), "aviary.sha256": tensors_checksum(cpu)}
    if config is not None:
        meta["aviary.config"] = json.dumps(config, sort_keys=True)
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    meta[HEADER_CHECKSUM] = header_checksum(meta)
    write_bytes_atomic(path, st_save_bytes(cpu, metadata=meta))


def torch_file_kind(path: str | os.PathLike) -> str | None:
    """``"zip"`` (``torch.save``'s container) or ``"pickle"`` (a raw pickle) for another
    toolkit's torch file, ``None`` for anything else (a safetensors file, or no file).

    A safetensors file is an 8-byte little-endian header size followed by the JSON header
    (``{``); only when that shape is absent do the zip / pickle magic bytes count, since a
    header size may itself start with 0x80 or "PK".
    """
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return None
    if head[:2] == b"PK":
        return "zip"
    return "pickle" if head[:1] == b"\x80" else None


def load_tensors(path: str | os.PathLike, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file written by :func:`save_tensors` (or any safetensors file).

    Returns:
        (tensors, metadata). ``metadata["aviary.config"]`` (if present) is a JSON string.

    Raises:
        CheckpointError: missing, truncated, corrupted (checksum mismatch) or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    kind = torch_file_kind(path)
    if kind is not None:
        # Whatever its name says: a pickle is never unpickled here.
        raise CheckpointError(f"{path}: a torch.save / pickle file ({kind}), not a safetensors file; it is "
                              "not loaded (unpickling runs code). Other toolkits' checkpoints go through "
                              "`aviary import`")
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path}: file is truncated ({len(data)} bytes)")
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    meta = dict(header.get("__metadata__") or {})
    if verify:
        verify_metadata(path, meta)
        if "aviary.sha256" in meta:
            got = tensors_checksum(tensors)
            if got != meta["aviary.sha256"]:
                raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted "
                                      f"(stored {meta['aviary.sha256'][:12]}..., computed {got[:12]}...)")
    return tensors, meta


def format_version(path: str | os.PathLike, meta: Mapping[str, str]) -> int | None:
    """The aviary format version in ``meta`` (``None``: a plain safetensors file)."""
    raw = meta.get("aviary.format_version")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CheckpointError(f"{path}: format version {raw!r} in the metadata is not a number; "
                              "the file is corrupted") from None


def verify_metadata(path: str | os.PathLike, meta: Mapping[str, str]) -> None:
    """Check the format version and (format >= 2) the checksum of the whole metadata.

    A file that carries a header checksum is always checked against it, whatever version it
    claims, so a bit flip that turns "2" into "0" cannot switch verification off.

    Raises:
        CheckpointError: newer format, damaged metadata or a missing checksum, naming ``path``.
    """
    version = format_version(path, meta)
    if version is not None and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer aviary (format {version} > {FORMAT_VERSION}); upgrade aviary")
    if HEADER_CHECKSUM in meta:
        if header_checksum(meta) != meta[HEADER_CHECKSUM]:
            raise CheckpointError(f"{path}: checksum mismatch in the header (config or format version "
                                  "changed since the file was written); the file is corrupted")
    elif version is not None and version >= 2:
        raise CheckpointError(f"{path}: format {version} but no {HEADER_CHECKSUM!r} in the metadata; "
                              "the file is corrupted")
    if version is not None and version >= 2 and "aviary.sha256" not in meta:
        raise CheckpointError(f"{path}: format {version} but no 'aviary.sha256' in the metadata; "
                              "the file is corrupted")


def load_config_from_metadata(path: str | os.PathLike, meta: Mapping[str, str]) -> dict[str, Any]:
    """Parse the JSON config stored in a weights file's metadata."""
    raw = meta.get("aviary.config")
    if raw is None:
        raise CheckpointError(f"{path}: no 'aviary.config' in the safetensors metadata; "
                              "not an aviary checkpoint (for other toolkits use `aviary import`)")
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: stored config is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: stored config is a JSON {type(cfg).__name__}, not an object")
    return cfg


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


def _json_checksum(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_tensors(tmp / MODEL_FILE, model_tensors, config=config)
        save_tensors(tmp / TRAINER_FILE, trainer_tensors)
        state = dict(trainer_state)
        state["checksum"] = _json_checksum(state)
        write_json_atomic(tmp / TRAINER_JSON, state)
        if final.exists():
            # Only when a resumed run re-reaches the step of a checkpoint it found damaged.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=root))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, CheckpointError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e.__cause__ if isinstance(e, CheckpointError) else e
        full = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        raise CheckpointError(f"could not write checkpoint {final}{' (disk full)' if full else ''}: "
                              f"{cause}; earlier checkpoints are intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if _json_checksum(state) != stored:
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
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            meta = dict(header.get("__metadata__") or {})
            verify_metadata(path, meta)
            return path, load_config_from_metadata(path, meta)
        except (OSError, ValueError, AttributeError, CheckpointError) as e:
            log.warning("%s: unreadable header (%s); trying the previous checkpoint", path, e)
    return None
