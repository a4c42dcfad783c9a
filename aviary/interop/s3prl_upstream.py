"""Export any aviary model as a self-contained s3prl upstream package (SUPERB).

``aviary export s3prl`` (:mod:`aviary.interop.s3prl`) writes s3prl's own Mockingjay / TERA /
Audio ALBERT checkpoint layout, which only post-LN, sinusoidal, R = 1 masked acoustic models
fit (s3prl >= 0.4 upstreams ignore ``downsample_rate``). This export instead writes a folder
that s3prl imports as one of its upstreams and that runs aviary itself, so every family
(R = 3 models, ALiBi, pre-LN, SSAST, vq-wav2vec, token-BERT) enters s3prl's runner::

    DIR/__init__.py
    DIR/hubconf.py             aviary_local(ckpt): s3prl's hub entry (-u aviary_local -k CKPT)
    DIR/expert.py              UpstreamExpert: list of 16 kHz wavs -> {"hidden_states": [...]}
    DIR/model.safetensors      the run's weights bundle (the default -k)
    DIR/aviary_upstream.json   what was exported: family, frame shift, sizes, sha256, source

The code files are copied from :mod:`aviary.interop.s3prl_expert` unchanged. Before the
folder is kept, the export loads it the way s3prl's runner and ``Featurizer`` do and checks
what they assert (a dict with a list of equally shaped (B, T, H) states, an integer
downsample rate, T within s3prl's tolerance of ``round(samples / rate)``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from aviary import __version__
from aviary.interop.s3prl_expert.expert import samples_per_frame
from aviary.models.registry import build_upstream_from_config
from aviary.storage import (atomic_dir, file_sha256, load_config_from_metadata, load_tensors, torch_file_kind,
                            write_json_atomic)
from aviary.train.checkpoint import find_weights

log = logging.getLogger(__name__)

ENTRY = "aviary_local"
MANIFEST_FILE = "aviary_upstream.json"
TEMPLATE_DIR = Path(__file__).resolve().parent / "s3prl_expert"
CODE_FILES = ("__init__.py", "hubconf.py", "expert.py")
# s3prl's upstream/interfaces.py: Featurizer.tolist asserts |T - round(max_len / rate)| < 5.
TOLERABLE_SEQLEN_DIFF = 5


class S3prlUpstreamError(ValueError):
    """An aviary model or folder that cannot become an s3prl upstream package."""


def load_exported_hubconf(pkg_dir: str | os.PathLike) -> ModuleType:
    """Import an exported package's ``hubconf`` as s3prl would (``s3prl.upstream.<name>.hubconf``),
    under a private package name, without s3prl."""
    pkg_dir = Path(pkg_dir).resolve()
    if not (pkg_dir / "hubconf.py").is_file():
        raise S3prlUpstreamError(f"{pkg_dir}: no hubconf.py; not an exported aviary upstream package")
    name = f"_aviary_s3prl_upstream_{uuid.uuid4().hex[:12]}"
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(f"{name}.hubconf")


def check_s3prl_interface(expert: torch.nn.Module, wavs: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Call an upstream expert as s3prl's runner and ``Featurizer`` do; raise on what they would reject.

    Args:
        expert: what ``aviary_local(ckpt)`` returned.
        wavs: waveforms to call it with (default: one second of noise, the ``Featurizer``'s probe).

    Returns:
        ``{"num_hidden_states", "hidden_size", "downsample_rate", "frames"}`` (frames of the longest wav).
    """
    if not isinstance(expert, torch.nn.Module):
        raise S3prlUpstreamError(f"the expert is a {type(expert).__name__}, not an nn.Module")
    if not callable(getattr(expert, "get_downsample_rates", None)):
        raise S3prlUpstreamError("the expert has no get_downsample_rates (s3prl's runner asserts it)")
    expert.eval()
    if wavs is None:
        wavs = [torch.randn(16000, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        out = expert(wavs)
    if not isinstance(out, dict) or "hidden_states" not in out:
        raise S3prlUpstreamError(f"the expert returned {type(out).__name__} without 'hidden_states'")
    hs = out["hidden_states"]
    if not isinstance(hs, (list, tuple)) or not hs:
        raise S3prlUpstreamError(f"hidden_states is a {type(hs).__name__}, not a non-empty list")
    shape = tuple(hs[0].shape)
    for i, h in enumerate(hs):
        if h.dim() != 3 or tuple(h.shape) != shape:
            raise S3prlUpstreamError(f"hidden_states[{i}] has shape {tuple(h.shape)}; s3prl's weighted sum "
                                     f"needs every state (B, T, H) = {shape}")
    if shape[0] != len(wavs):
        raise S3prlUpstreamError(f"hidden states have batch size {shape[0]} for {len(wavs)} waveforms")
    rate = expert.get_downsample_rates("hidden_states")
    if not isinstance(rate, int) or rate < 1:
        raise S3prlUpstreamError(f"get_downsample_rates returned {rate!r}; s3prl needs a positive int")
    expected = round(max(len(w) for w in wavs) / rate)
    if abs(shape[1] - expected) >= TOLERABLE_SEQLEN_DIFF:
        raise S3prlUpstreamError(f"{shape[1]} frames for {max(len(w) for w in wavs)} samples at {rate} samples "
                                 f"per frame; s3prl's Featurizer expects {expected} (+- {TOLERABLE_SEQLEN_DIFF - 1})")
    return {"num_hidden_states": len(hs), "hidden_size": shape[2], "downsample_rate": rate, "frames": shape[1]}


def export_s3prl_upstream(run: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``aviary export s3prl-upstream RUN --out DIR``: write an s3prl upstream package.

    Args:
        run: an aviary run directory or ``.safetensors`` bundle, of any family.
        out_dir: the folder to create (it must not exist or be empty); drop it into s3prl's
            ``upstream/`` folder as ``upstream/aviary``.

    Returns:
        ``out_dir``.

    Raises:
        S3prlUpstreamError: a torch / pickle file (import it first), a non-empty ``out_dir``,
            a model s3prl cannot feed (not 16 kHz, frame shift not a whole number of samples),
            or a package that fails the runner's checks.
    """
    wpath = find_weights(run)
    if torch_file_kind(wpath) is not None:
        raise S3prlUpstreamError(f"{wpath}: a torch/pickle file, not an aviary safetensors bundle; for an s3prl "
                                 f"checkpoint run `aviary import s3prl {wpath} --out RUN` first")
    # The file is verified here (checksums); the model's shape facts need no weights, so it
    # is built on the meta device. The exported package loads the weights for real below.
    _tensors, file_meta = load_tensors(wpath)
    meta = load_config_from_metadata(wpath, file_meta)
    with torch.device("meta"):
        _cfg, up = build_upstream_from_config(meta, source=wpath)
    if up.sample_rate != 16000:
        raise S3prlUpstreamError(f"{wpath}: the model takes {up.sample_rate} Hz audio; s3prl feeds 16000 Hz")
    try:
        rate = samples_per_frame(up.frame_shift)
    except ValueError as e:
        raise S3prlUpstreamError(f"{wpath}: {e}") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise S3prlUpstreamError(f"{out_dir}: exists and is not an empty folder; choose a new --out")
    model_cfg = meta.get("model", {})
    manifest = {
        "entry": ENTRY, "weights": "model.safetensors", "source": str(wpath.resolve()),
        "sha256": file_sha256(wpath), "family": model_cfg.get("family"), "step": meta.get("step"),
        "frame_shift": up.frame_shift, "downsample_rate": rate,
        "tokens_per_step": int(getattr(up, "tokens_per_step", 1)),
        "hidden_size": up.hidden_size * int(getattr(up, "tokens_per_step", 1)),
        "num_hidden_states": up.num_hidden_states,
        "aviary_version": __version__, "format_version": meta.get("format_version"),
    }
    # Built under a hidden name and renamed (replacing an empty DIR): DIR exists only when complete.
    with atomic_dir(out_dir) as tmp:
        for name in CODE_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        shutil.copyfile(wpath, tmp / manifest["weights"])
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
    try:
        expert = getattr(load_exported_hubconf(out_dir), ENTRY)(ckpt=None, model_config=None, refresh=False)
        got = check_s3prl_interface(expert)
    except Exception as e:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise S3prlUpstreamError(f"{wpath}: the exported package fails s3prl's checks: {e}") from e
    if got["downsample_rate"] != rate or got["num_hidden_states"] != up.num_hidden_states:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise S3prlUpstreamError(f"{wpath}: the package reports {got}, the model {manifest}")
    log.info("exported %s (%s, %d hidden states of %d, %d samples per frame) to %s", wpath, manifest["family"],
             manifest["num_hidden_states"], manifest["hidden_size"], rate, out_dir)
    return out_dir


__all__ = ["ENTRY", "MANIFEST_FILE", "S3prlUpstreamError", "export_s3prl_upstream", "load_exported_hubconf",
           "check_s3prl_interface"]
