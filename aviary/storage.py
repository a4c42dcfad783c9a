"""The one way aviary writes and verifies files: safetensors + checksums, atomic writes, JSON.

Bottom layer: imports nothing of aviary but :mod:`aviary.config`, so every package (``data/``,
``evaluate/``, ``train/``, ``interop/``...) writes through it.

Weights files (format ``FORMAT_VERSION``):

* A weights file is a plain ``.safetensors`` file. Its string metadata holds
  ``aviary.format_version``, ``aviary.sha256`` (:func:`tensors_checksum` over every tensor's
  name, dtype, shape and bytes, so truncation or bit rot is detected even where safetensors'
  own header check passes) and ``aviary.config`` (the JSON config needed to rebuild the
  model, built by :func:`checkpoint_config`). Such a file is self-contained: it is the
  "single-file bundle" :func:`aviary.load` accepts. Since format 2, ``aviary.header_sha256``
  covers all of that metadata as well (a flipped bit in the stored ``num_layers`` would
  otherwise build a different model).

Atomic write = write to a temporary file in the same directory, flush + fsync,
``os.replace`` onto the final name, fsync the directory (:func:`atomic_open`). A crash at
any point leaves either the old file or the new one, never a mix; a full disk raises
:class:`CheckpointError` and leaves the previous file untouched. :func:`atomic_dir` does the
same for a whole directory, :func:`append_jsonl` appends one record as a single fsynced line.

Nothing is ever pickled.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from aviary.config import Config

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported inside the functions that handle tensors: the JSON and
# atomic-write helpers serve `aviary.data` (manifests, `aviary prepare`, `check-data`), which
# stays free of torch's seconds-long import.

FORMAT_VERSION = 2
"""Bumped whenever the on-disk layout changes; older versions must keep loading.

1: ``aviary.sha256`` covers the tensors only (a flipped bit in the stored config went unseen).
2: ``aviary.header_sha256`` also covers the whole string metadata: config, format version
   and the tensor checksum.
"""

HEADER_CHECKSUM = "aviary.header_sha256"


class CheckpointError(RuntimeError):
    """A stored file (checkpoint, JSON sidecar...) is missing, truncated, corrupted, or cannot
    be written. The message names the file."""


# Checksums


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name).

    The one state-dict hash: checkpoints store it (``aviary.sha256``) and feature caches
    fingerprint an upstream's weights with it.
    """
    import torch  # deferred: heavy (see the imports above)

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_checksum(obj: Any) -> str:
    """SHA-256 of ``obj`` as key-sorted JSON (what JSON sidecars store about themselves)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def header_checksum(meta: Mapping[str, str]) -> str:
    """SHA-256 over every metadata entry but :data:`HEADER_CHECKSUM` itself (format 2)."""
    return json_checksum({k: v for k, v in meta.items() if k != HEADER_CHECKSUM})


# Atomic writes


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory (or file) so a rename inside it survives a crash; best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[Any]:
    """Open a temporary binary file beside ``path``; on success fsync and rename it onto ``path``.

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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name, then put it at ``final`` in one rename.

    Yields the temporary directory (``tmp``, or a hidden ``.NAME.XXXX.tmp`` beside ``final``).
    When the block ends, every file in it is fsynced, an existing ``final`` is replaced, and
    the parent directory is fsynced: a directory named ``final`` is therefore always complete.
    On any error the temporary directory is removed and the error re-raised unchanged (the
    caller words it), so ``final`` and its siblings are left as they were.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        work = Path(tmp)
        work.mkdir()
    try:
        yield work
        for f in work.rglob("*"):
            if f.is_file():
                fsync_dir(f)  # opens read-only and fsyncs: works for files too
        fsync_dir(work)
        if final.exists():
            # Replacing a directory (a resumed run re-reaching the step of a damaged checkpoint).
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], hint: str = "") -> None:
    """Append ``record`` as one key-sorted JSON line: one ``write`` with ``O_APPEND``, then fsync.

    A kill mid-write leaves at worst a torn last line (readers skip it); the next append
    starts a new line after it.

    Args:
        path: the ``.jsonl`` file (created with its directory).
        record: JSON-able mapping.
        hint: what to tell the user after a failure (e.g. how to continue).

    Raises:
        OSError: with ``filename=path``, so the command line names the file and the reason.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            # A previous run killed mid-write may have left a line without its newline.
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):  # a torn line is ignored by readers; say why it happened
            raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written (disk full?)")
        os.fsync(fd)
    except OSError as e:
        # Name the file: a bare "[Errno 28] No space left on device" leaves the user guessing.
        raise OSError(e.errno, f"could not append a record ({e.strerror}){'; ' + hint if hint else ''}",
                      str(path)) from e
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, error: type[Exception] = CheckpointError, hint: str = "") -> Any:
    """Read a JSON file, with an error naming the file when it is missing or malformed.

    Args:
        path: the file.
        error: the exception raised (a caller's own, e.g. the feature cache's ``CacheError``).
        hint: what to do about a malformed file, appended to its message.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){'; ' + hint if hint else ''}") from None


# Weights files


def checkpoint_config(model: Config | Mapping[str, Any], train: Config | Mapping[str, Any] | None = None,
                      step: int | None = None, **extra: Any) -> dict[str, Any]:
    """The config dict stored in every aviary weights file (``aviary.config``).

    ``{"model": <pretraining config>, "train": <train config or None>, "step": N,
    "format_version": FORMAT_VERSION, **extra}`` (e.g. ``source`` for imported models); the
    one place it is built, whether by the training loop, :func:`aviary.hub.save_bundle` or an
    importer.
    """
    def plain(c: Any) -> Any:
        return c.to_dict() if isinstance(c, Config) else (dict(c) if c is not None else None)

    return {"model": plain(model), "train": plain(train), "step": step,
            "format_version": FORMAT_VERSION, **extra}


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
    from safetensors.torch import save as st_save_bytes  # deferred: heavy (torch)

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
    from safetensors import SafetensorError  # type: ignore[attr-defined]  # deferred: heavy (torch)
    from safetensors.torch import load as st_load_bytes

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


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header alone (not the weights).

    Raises:
        OSError / ValueError: the file is missing or its header unreadable (callers that
            fall back to another file catch these).
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return dict(header.get("__metadata__") or {})


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
