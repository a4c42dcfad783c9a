"""Import released SSAST checkpoints (github.com/YuanGongND/ssast) into aviary.

A released SSAST pretraining checkpoint is a ``torch.save``-d state dict of the
``DataParallel``-wrapped ``ASTModel``; its backbone is a timm DeiT ("vit_deit_*_distilled")::

=====================================================  ==============================================
SSAST key (after dropping ``module.``)                 aviary ``PretrainModel`` key
=====================================================  ==============================================
``v.patch_embed.proj.{weight,bias}`` (D, 1, f, t)      ``upstream.encoder.patch_embed.proj.*``
``v.cls_token``, ``v.dist_token`` (1, 1, D)            ``upstream.encoder.prefix_tokens`` rows 0, 1
``v.pos_embed`` (1, P + Pf * Pt, D)                    ``upstream.encoder.prefix_pos_embed`` (P, D)
                                                       and ``upstream.encoder.pos_embed`` (Pt, Pf, D)
``v.blocks.N.norm1``                                   ``upstream.encoder.layers.layers.N.ln_attn``
``v.blocks.N.attn.qkv`` (3 D, D), fused q; k; v        ``...layers.N.attn.{q,k,v}_proj``
``v.blocks.N.attn.proj``                               ``...layers.N.attn.out_proj``
``v.blocks.N.norm2``                                   ``...layers.N.ln_ffn``
``v.blocks.N.mlp.fc1``, ``v.blocks.N.mlp.fc2``         ``...layers.N.ffn.fc1``, ``...ffn.fc2``
``v.norm``                                             ``upstream.encoder.norm``
``cpredlayer.{0,2}`` / ``gpredlayer.{0,2}``            ``objective.disc_head.{0,2}`` / ``gen_head``
``mask_embed`` (1, 1, D)                               ``upstream.encoder.mask_token`` (D,)
``p_input_fdim``, ``p_input_tdim`` (scalars)           config: ``n_mels``, ``max_frames``, the grid
=====================================================  ==============================================

The reference flattens the patch grid frequency-major (``index = f * Pt + t``); aviary orders
tokens time-major, so the position table is reshaped to (Pf, Pt, D) and transposed.
Both models compute the same function (pre-LN blocks, eps 1e-6, exact GELU, the mask
token substituted before the position embedding is added), which
``tests/interop/test_ssast_import.py`` checks against a plain re-computation of the
reference forward pass. Not imported: DeiT's unused classifier heads (``v.head``,
``v.head_dist``) and fine-tuning heads (``mlp_head``); they are listed in a log message.

The number of attention heads is not stored in the file; it follows from the width for the
released sizes (192 -> 3, 384 -> 6, 768 -> 12) and must be given for other widths. The
fbank statistics default to the AudioSet values SSAST pretraining used.

Files are read with ``torch.load(weights_only=True)``: nothing but tensors and containers is
ever unpickled.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from aviary.features import FrontEndConfig
from aviary.models.registry import build_pretrain
from aviary.models.ssast import SSASTConfig, SSASTEncoderConfig
from aviary.objectives.base import PretrainModel
from aviary.objectives.mspm import MSPMConfig
from aviary.train.checkpoint import refuse_existing_model, write_imported_run

log = logging.getLogger(__name__)

# DeiT widths used by SSAST -> attention heads.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12}
# AudioSet fbank statistics from the SSAST recipes.
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


class SSASTImportError(ValueError):
    """A file is not a usable SSAST checkpoint; the message names the file and the key."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SSASTImportError(f"{path}: file not found") from None
    except pickle.UnpicklingError as e:
        # torch's own message ends "Re-running torch.load with weights_only set to False will
        # likely succeed": advice that runs the file's code. Keep only what was refused.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise SSASTImportError(
            f"{path}: refused to load: the file contains pickled Python objects beyond tensors and "
            f"plain containers{f' ({detail})' if detail else ''}. aviary never unpickles such objects, "
            "since that can run code; an SSAST checkpoint is a plain state dict of tensors") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        msg = " ".join(ln.strip() for ln in str(e).splitlines()
                       if ln.strip() and "weights_only" not in ln)  # never suggest unpickling
        raise SSASTImportError(f"{path}: not a readable weights-only torch checkpoint ({type(e).__name__}: {msg})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SSASTImportError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    # DataParallel's "module." prefix (present in every released file).
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _need(sd: Mapping[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    if key not in sd:
        raise SSASTImportError(f"{where}: key 'module.{key}' missing; not an SSAST pretraining checkpoint "
                               f"(keys start with {sorted(sd)[:5]})")
    return sd[key]


def convert_ssast_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                             num_heads: int | None = None, fbank_mean: float = AUDIOSET_MEAN,
                             fbank_std: float = AUDIOSET_STD
                             ) -> tuple[SSASTConfig, dict[str, torch.Tensor]]:
    """Map an SSAST state dict (``module.`` prefix already dropped) to aviary's layout.

    Args:
        sd: the reference state dict.
        path: named in error messages.
        num_heads: attention heads; inferred for the released widths (192, 384, 768).
        fbank_mean, fbank_std: corpus statistics of the pretraining data.

    Returns:
        (config, tensors for :class:`~aviary.objectives.base.PretrainModel`).

    Raises:
        SSASTImportError: a key is missing or a shape does not fit, naming both.
    """
    where = Path(path)
    proj_w = _need(sd, "v.patch_embed.proj.weight", where)  # (D, 1, f, t)
    if proj_w.dim() != 4 or proj_w.shape[1] != 1:
        raise SSASTImportError(f"{where}: v.patch_embed.proj.weight has shape {tuple(proj_w.shape)}, "
                               "expected (D, 1, patch_freq, patch_time)")
    D, _, pf, pt = proj_w.shape
    fdim = int(_need(sd, "p_input_fdim", where).reshape(-1)[0])
    tdim = int(_need(sd, "p_input_tdim", where).reshape(-1)[0])
    # SSAST pretrains without overlap (stride = patch size).
    Pf, Pt = (fdim - pf) // pf + 1, (tdim - pt) // pt + 1
    n_prefix = int("v.cls_token" in sd) + int("v.dist_token" in sd)
    if "v.dist_token" in sd and "v.cls_token" not in sd:
        raise SSASTImportError(f"{where}: has v.dist_token but no v.cls_token")
    pos = _need(sd, "v.pos_embed", where)  # (1, P + Pf*Pt, D)
    if pos.shape != (1, n_prefix + Pf * Pt, D):
        raise SSASTImportError(f"{where}: v.pos_embed has shape {tuple(pos.shape)}, expected "
                               f"(1, {n_prefix + Pf * Pt}, {D}) for a {Pf} x {Pt} grid "
                               f"(p_input_fdim={fdim}, p_input_tdim={tdim}) and {n_prefix} prefix tokens")
    layer_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"v\.blocks\.(\d+)\.", k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise SSASTImportError(f"{where}: transformer blocks v.blocks.N are missing or not numbered 0..L-1 "
                               f"(found {layer_ids[:20]})")
    L = len(layer_ids)
    if num_heads is None:
        if D not in _HEADS_BY_WIDTH:
            raise SSASTImportError(f"{where}: width {D} is not a released SSAST size "
                                   f"({sorted(_HEADS_BY_WIDTH)}); pass num_heads")
        num_heads = _HEADS_BY_WIDTH[D]
    ffn = int(_need(sd, "v.blocks.0.mlp.fc1.weight", where).shape[0])
    kind = "frame" if pf == fdim else "patch"
    cfg = SSASTConfig(
        frontend=FrontEndConfig(kind="fbank", n_mels=fdim, fbank_mean=fbank_mean, fbank_std=fbank_std),
        encoder=SSASTEncoderConfig(hidden_size=D, num_layers=L, num_heads=num_heads, ffn_size=ffn,
                                   n_mels=fdim, patch_freq=pf, patch_time=pt, stride_freq=pf,
                                   stride_time=pt, num_prefix_tokens=n_prefix, pos_freq=Pf, pos_time=Pt),
        objective=MSPMConfig(masking="cluster" if kind == "patch" else "random"),
        max_frames=tdim)

    enc = "upstream.encoder."
    out: dict[str, torch.Tensor] = {
        enc + "patch_embed.proj.weight": proj_w,
        enc + "patch_embed.proj.bias": _need(sd, "v.patch_embed.proj.bias", where),
        enc + "prefix_tokens": torch.cat([sd[k].reshape(1, D) for k in ("v.cls_token", "v.dist_token")
                                          if k in sd] or [proj_w.new_zeros(0, D)]),
        enc + "prefix_pos_embed": pos[0, :n_prefix],
        # Reference order f * Pt + t -> aviary grid (Pt, Pf, D).
        enc + "pos_embed": pos[0, n_prefix:].reshape(Pf, Pt, D).transpose(0, 1).contiguous(),
        enc + "mask_token": _need(sd, "mask_embed", where).reshape(D),
        enc + "norm.weight": _need(sd, "v.norm.weight", where),
        enc + "norm.bias": _need(sd, "v.norm.bias", where),
    }
    for i in range(L):
        src, dst = f"v.blocks.{i}.", f"{enc}layers.layers.{i}."
        qkv_w = _need(sd, src + "attn.qkv.weight", where)
        qkv_b = _need(sd, src + "attn.qkv.bias", where)
        if qkv_w.shape != (3 * D, D):
            raise SSASTImportError(f"{where}: {src}attn.qkv.weight has shape {tuple(qkv_w.shape)}, expected ({3 * D}, {D})")
        for name, w, b in zip(("q", "k", "v"), qkv_w.chunk(3), qkv_b.chunk(3)):
            out[f"{dst}attn.{name}_proj.weight"] = w
            out[f"{dst}attn.{name}_proj.bias"] = b
        for a, b in (("norm1", "ln_attn"), ("attn.proj", "attn.out_proj"), ("norm2", "ln_ffn"),
                     ("mlp.fc1", "ffn.fc1"), ("mlp.fc2", "ffn.fc2")):
            out[f"{dst}{b}.weight"] = _need(sd, f"{src}{a}.weight", where)
            out[f"{dst}{b}.bias"] = _need(sd, f"{src}{a}.bias", where)
    for a, b in (("cpredlayer", "objective.disc_head"), ("gpredlayer", "objective.gen_head")):
        for idx in (0, 2):  # Linear, ReLU, Linear
            for p in ("weight", "bias"):
                out[f"{b}.{idx}.{p}"] = _need(sd, f"{a}.{idx}.{p}", where)
    used = {"v.patch_embed.proj.weight", "v.patch_embed.proj.bias", "v.cls_token", "v.dist_token",
            "v.pos_embed", "mask_embed", "v.norm.weight", "v.norm.bias", "p_input_fdim", "p_input_tdim"}
    used |= {k for k in sd if k.startswith(("v.blocks.", "cpredlayer.", "gpredlayer."))}
    ignored = sorted(set(sd) - used)
    if ignored:
        log.info("%s: not imported (classifier heads, unused by SSAST pretraining): %s", where, ignored)
    return cfg, {k: v.detach().clone().float() for k, v in out.items()}


def load_ssast_checkpoint(path: str | os.PathLike, num_heads: int | None = None,
                          fbank_mean: float = AUDIOSET_MEAN, fbank_std: float = AUDIOSET_STD
                          ) -> PretrainModel:
    """Load a released SSAST checkpoint as an aviary pretraining model, in memory.

    Args:
        path: the ``.pth`` file (e.g. ``SSAST-Base-Patch-400.pth``).
        num_heads: attention heads for non-released widths.
        fbank_mean, fbank_std: fbank statistics of the pretraining data (AudioSet defaults).

    Returns:
        The :class:`~aviary.objectives.base.PretrainModel` in eval mode; its ``upstream``
        extracts hidden states, and it can be pretrained further.

    Raises:
        SSASTImportError: unreadable or unsupported file.
    """
    path = Path(path)
    cfg, tensors = convert_ssast_state_dict(_read_state_dict(path), path, num_heads, fbank_mean, fbank_std)
    model = build_pretrain(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise SSASTImportError(f"{path}: mapped weights do not fit the aviary model "
                               f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model.eval()


def import_ssast_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                            num_heads: int | None = None, fbank_mean: float = AUDIOSET_MEAN,
                            fbank_std: float = AUDIOSET_STD) -> Path:
    """``aviary import ssast CKPT --out RUN_DIR``: write an aviary run directory.

    Writes ``RUN_DIR/model.safetensors`` (the pretraining model, config in its metadata, so
    ``aviary.load(RUN_DIR)`` works and ``aviary pretrain --resume``-style continuation can
    start from it) and ``RUN_DIR/run.json``. Arguments as :func:`load_ssast_checkpoint`.

    Returns:
        The path of the weights file.

    Raises:
        SSASTImportError: unreadable or unsupported file; FileExistsError if ``RUN_DIR``
            holds a model already.
    """
    path, out = Path(path), Path(out_dir)
    refuse_existing_model(out)  # before the (slow) reading
    model = load_ssast_checkpoint(path, num_heads, fbank_mean, fbank_std)
    cfg = model.config
    source = {"toolkit": "ssast", "path": str(path.resolve())}
    weights = write_imported_run(out, model.state_dict(), cfg, step=0, source=source)
    log.info("imported %s (SSAST %s, D=%d, %d layers) into %s", path,
             "frame" if cfg.encoder.grid_freq == 1 else "patch", cfg.encoder.hidden_size,
             cfg.encoder.num_layers, out)
    return weights
