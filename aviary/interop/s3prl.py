"""Import and export s3prl Mockingjay / TERA / Audio ALBERT checkpoints.

An s3prl upstream checkpoint is a ``torch.save``-d dict::

    {"Upstream_Config": {"transformer": {...}, "task": {...}, "audio": {...}},   # older: "Config"
     "Transformer": <encoder state dict>, "SpecHead": <head state dict>, "Step": N, ...}

Its encoder (s3prl ``upstream/mockingjay/model.py``, a BERT encoder) maps one-to-one onto
aviary's :class:`~aviary.models.encoder.TransformerEncoder`:

==============================================================  ==========================================
s3prl ``Transformer``                                           aviary ``upstream.encoder``
==============================================================  ==========================================
``input_representations.spec_transform``                        ``input_proj``
``input_representations.LayerNorm``                             ``input_ln``
``encoder.layer.N.attention.self.{query,key,value}``            ``layers.layers.N.attn.{q,k,v}_proj``
``encoder.layer.N.attention.output.dense``                      ``layers.layers.N.attn.out_proj``
``encoder.layer.N.attention.output.LayerNorm``                  ``layers.layers.N.ln_attn``
``encoder.layer.N.intermediate.dense``                          ``layers.layers.N.ffn.fc1``
``encoder.layer.N.output.dense``                                ``layers.layers.N.ffn.fc2``
``encoder.layer.N.output.LayerNorm``                            ``layers.layers.N.ln_ffn``
``SpecHead.{dense,LayerNorm,output}``                           ``head.{dense,ln,out}``
==============================================================  ==========================================

Both compute ``LN(Linear(stack_R(x)) + PE) -> L post-LN layers`` with the same sinusoidal
table, and s3prl's ``OnlinePreprocessor`` (centred STFT, periodic Hann, power spectrum,
HTK mel, ``log(x + 1e-10)``, deltas, per-utterance CMVN, waveform at ``target_level`` dB) is
what aviary's ``logmel`` / ``linear`` front-ends compute, so an imported model gives s3prl's
hidden states. Where s3prl differs from aviary's defaults the import sets the matching option:
frame stacking drops the ``T % R`` trailing frames (``encoder.stack_tail="drop"``), and inputs
longer than ``task.sequence_length`` frames are encoded in windows (``chunk_seconds``; s3prl
cuts ``ceil(T / sequence_length)`` equal chunks, aviary fixed windows, so the two differ only
beyond ``sequence_length`` frames, 15 s for the released models).

Not representable, refused with a message: pre-LN encoders (s3prl normalises every hidden
state with its own extra LayerNorm), ``swish`` activations, Kaldi / MFCC / non-log features.

Files are read with ``torch.load(weights_only=True)``: nothing but tensors, containers and
numbers is ever unpickled. The only class allowed besides is ``argparse.Namespace`` (s3prl
stores its command-line arguments in every checkpoint; building one runs no code). A file
that needs anything else (old checkpoints pickled optimizer / scheduler objects) is refused
with a message that explains how to strip it in s3prl's own environment.

Export writes the same layout from an aviary run (plain tensors and dicts only), loadable by
s3prl's ``mockingjay_local`` / ``tera_local`` / ``audio_albert_local``. It also stores the
full aviary config under the extra top-level key ``"aviary"`` (s3prl ignores it), so that
importing an exported file restores aviary-only settings and reproduces the hidden states
exactly.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from aviary.config import ConfigError
from aviary.features import FrontEndConfig
from aviary.models.encoder import EncoderConfig
from aviary.models.mam import MAMConfig, MAMUpstream
from aviary.models.registry import build_pretrain
from aviary.models.upstream import upstream_state
from aviary.objectives.masking import MaskingConfig
from aviary.storage import FORMAT_VERSION, file_sha256, load_config_from_metadata, load_tensors, write_bytes_atomic
from aviary.train.checkpoint import find_weights, refuse_existing_model, write_imported_run

log = logging.getLogger(__name__)

# Classes (besides tensors and builtin containers) a checkpoint may contain. Rebuilding a
# Namespace only sets attributes; it cannot run code.
SAFE_GLOBALS = [argparse.Namespace]

_ENC = "upstream.encoder."
_LAYER_MAP = {  # s3prl layer sub-key -> aviary layer sub-key
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "ln_attn",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ln_ffn",
}
_INPUT_MAP = {
    "input_representations.spec_transform": "input_proj",
    "input_representations.LayerNorm": "input_ln",
}
_HEAD_MAP = {"dense": "dense", "LayerNorm": "ln", "output": "out"}


class S3prlError(ValueError):
    """An s3prl checkpoint cannot be read, or a model cannot be expressed in s3prl's format."""


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a torch-saved dict without unpickling arbitrary objects.

    Args:
        path: the checkpoint file.

    Returns:
        The checkpoint dict (tensors on CPU).

    Raises:
        S3prlError: missing file, not a torch checkpoint, or a file that needs classes other
            than tensors / containers / ``argparse.Namespace`` (it is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise S3prlError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[-1] if first else "")
        raise S3prlError(
            f"{path}: refused to load: the file contains pickled Python objects beyond tensors "
            f"and plain containers ({detail}). aviary never unpickles arbitrary objects, since that "
            "can run code. If you trust the file, strip it in an environment that has s3prl: "
            "ck = torch.load(PATH, weights_only=False); torch.save({k: ck[k] for k in "
            "('Upstream_Config', 'Transformer', 'SpecHead', 'Step') if k in ck}, 'clean.ckpt')") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise S3prlError(f"{path}: not a readable torch checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise S3prlError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _upstream_config(ck: Mapping[str, Any], path: Path) -> dict[str, Any]:
    # s3prl's builder: legacy files keep the upstream config under "Config", newer under
    # "Upstream_Config" (and the runner config under "Config").
    for key in ("Upstream_Config", "Config"):
        cfg = ck.get(key)
        if isinstance(cfg, Mapping) and "transformer" in cfg:
            return dict(cfg)
    raise S3prlError(f"{path}: no 'Upstream_Config' (or legacy 'Config') with a 'transformer' section; "
                     f"top-level keys are {sorted(map(str, ck))}. Not an s3prl Mockingjay/TERA/AALBERT checkpoint")


def _get(section: Mapping[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in section:
        return section[key]
    if default is ...:
        raise S3prlError(f"{where}: missing key '{key}' (present: {sorted(section)})")
    return default


def _frontend_from_s3prl(audio: Mapping[str, Any], feat: Mapping[str, Any], where: str) -> FrontEndConfig:
    """The aviary front-end that computes what s3prl's OnlinePreprocessor computes for ``feat``."""
    feat_type = _get(feat, "feat_type", where)
    if feat_type not in ("mel", "linear"):
        raise S3prlError(f"{where}.feat_type = {feat_type!r}: aviary reproduces 'mel' and 'linear' "
                         "s3prl features only (not wav / complx / phase / mfcc)")
    if not bool(feat.get("log", False)):
        raise S3prlError(f"{where}.log = {feat.get('log')!r}: aviary's front-ends are log-compressed; "
                         "linear-amplitude s3prl features are not supported")
    delta = int(feat.get("delta", 0))
    sr = int(audio.get("sample_rate", 16000))
    # OnlinePreprocessor defaults: win 25 ms, hop 10 ms, 201 frequency bins, 40 mel bins.
    n_freq = int(audio.get("n_freq", 201))
    target_level = audio.get("target_level")
    try:
        return FrontEndConfig(
            kind="logmel" if feat_type == "mel" else "linear",
            sample_rate=sr,
            win_length=round(float(audio.get("win_ms", 25)) * sr / 1000),
            hop_length=round(float(audio.get("hop_ms", 10)) * sr / 1000),
            n_fft=(n_freq - 1) * 2,
            n_mels=int(audio.get("n_mels", 40)),
            delta_order=delta,
            cmvn="utterance" if bool(feat.get("cmvn", False)) else "none",
            log_eps=float(audio.get("eps", 1e-10)),
            normalize_db=None if target_level is None else float(target_level),
        )
    except ConfigError as e:
        raise S3prlError(f"{where}: {e}") from None


def config_from_s3prl(upstream_config: Mapping[str, Any], path: str | os.PathLike = "<checkpoint>"):
    """Build the aviary :class:`~aviary.models.mam.MAMConfig` of an s3prl upstream config.

    Args:
        upstream_config: the checkpoint's ``Upstream_Config`` (``transformer``, ``task``,
            ``audio`` sections).
        path: named in error messages.

    Returns:
        A validated ``MAMConfig`` (``encoder.stack_tail="drop"`` as s3prl stacks frames).

    Raises:
        S3prlError: a setting aviary cannot reproduce, naming the key and value.
    """
    where = f"{path}: Upstream_Config"
    tr = upstream_config["transformer"]
    task = upstream_config.get("task") or {}
    audio = upstream_config.get("audio") or upstream_config.get("online")
    if not audio:
        raise S3prlError(f"{where} has no 'audio' section: the model was trained on pre-extracted "
                         "features, so aviary cannot compute its input from waveforms")
    if "kaldi" in audio:
        raise S3prlError(f"{where}.audio uses s3prl's Kaldi feature extracter; only the online "
                         "('mel' / 'linear') preprocessor is supported")
    if bool(tr.get("pre_layer_norm", False)):
        raise S3prlError(f"{where}.transformer.pre_layer_norm = True: s3prl's pre-LN encoder applies "
                         "an extra LayerNorm to every hidden state, which aviary's encoder does not have")
    for flag in ("dual_transformer", "wave_transformer"):
        if tr.get(flag):
            raise S3prlError(f"{where}.transformer.{flag} = {tr[flag]!r} is not supported")
    act = str(_get(tr, "hidden_act", f"{where}.transformer"))
    if act not in ("gelu", "relu"):
        raise S3prlError(f"{where}.transformer.hidden_act = {act!r}: supported are 'gelu' and 'relu'")
    inp = _frontend_from_s3prl(audio, _get(audio, "input", f"{where}.audio"), f"{where}.audio.input")
    # s3prl's get_preprocessor uses the input features as target when there is no 'target'.
    tgt = _frontend_from_s3prl(audio, audio.get("target") or audio["input"], f"{where}.audio.target")
    t = f"{where}.transformer"
    share = bool(tr.get("share_layer", False))
    freq = float(task.get("mask_frequency", 0.0))
    noise = float(task.get("noise_proportion", 0.0))
    span = int(task.get("mask_consecutive_min", 7))
    if int(task.get("mask_consecutive_max", span)) != span:
        log.warning("%s.task: mask_consecutive_min/max = %s/%s; aviary masks fixed spans of %d",
                    where, span, task.get("mask_consecutive_max"), span)
    seq_len = int(task.get("sequence_length", 0))
    hop_s = inp.hop_length / inp.sample_rate
    # sequence_length counts front-end frames; 0 = no limit (aviary's widest window then).
    chunk_seconds = min(600.0, max(1.0, seq_len * hop_s)) if seq_len > 0 else 600.0
    try:
        encoder = EncoderConfig(
            hidden_size=int(_get(tr, "hidden_size", t)),
            num_layers=int(_get(tr, "num_hidden_layers", t)),
            num_heads=int(_get(tr, "num_attention_heads", t)),
            ffn_size=int(_get(tr, "intermediate_size", t)),
            dropout=float(tr.get("hidden_dropout_prob", 0.1)),
            attn_dropout=float(tr.get("attention_probs_dropout_prob", 0.1)),
            activation=act,
            pre_ln=False,
            ln_eps=float(tr.get("layer_norm_eps", 1e-12)),
            share_layers=share,
            downsample=int(tr.get("downsample_rate", 1)),
            init_std=float(tr.get("initializer_range", 0.02)),
            stack_tail="drop",
        )
        masking = MaskingConfig(mask_proportion=float(task.get("mask_proportion", 0.15)), span=span,
                                freq_mask_ratio=freq, noise_prob=noise)
        variant = "aalbert" if share else "tera" if (freq > 0 or noise > 0) else "mockingjay"
        return MAMConfig(variant=variant, input=inp, target=tgt, encoder=encoder, masking=masking,
                         chunk_seconds=chunk_seconds)
    except ConfigError as e:
        raise S3prlError(f"{where}: {e}") from None


def _strip(sd: Mapping[str, Any], path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a state dict, with DataParallel's ``module.`` and TF-style gamma/beta undone."""
    if not isinstance(sd, Mapping):
        raise S3prlError(f"{path}: '{what}' is a {type(sd).__name__}, expected a state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise S3prlError(f"{path}: '{what}.{k}' is a {type(v).__name__}, expected a tensor")
        k = k[len("module."):] if k.startswith("module.") else k
        # Old BERT-style names, renamed the same way s3prl's loader does.
        if k.endswith(".gamma"):
            k = k[:-len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[:-len("beta")] + "bias"
        out[k] = v
    return out


def state_dict_from_s3prl(transformer: Mapping[str, Any], spec_head: Mapping[str, Any] | None, cfg,
                          path: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Map s3prl ``Transformer`` (+ ``SpecHead``) tensors onto aviary pretraining-model names.

    Every s3prl key must be used and every aviary encoder key found; with ``share_layer``
    all layers must hold identical tensors (they become aviary's single shared layer).

    Returns:
        State dict for the MAM ``PretrainModel`` (``head.*`` only when
        ``spec_head`` is given).

    Raises:
        S3prlError: naming the unknown, missing, mis-shaped or unequal keys.
    """
    path = Path(path)
    src = _strip(transformer, path, "Transformer")
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(skey: str, akey: str) -> torch.Tensor:
        if skey not in src:
            raise S3prlError(f"{path}: 'Transformer' lacks '{skey}' (has e.g. {sorted(src)[:4]})")
        used.add(skey)
        out[akey] = src[skey].float()
        return out[akey]

    for s, a in _INPUT_MAP.items():
        for p in ("weight", "bias"):
            take(f"{s}.{p}", f"{_ENC}{a}.{p}")
    L = cfg.encoder.num_layers
    n_src = len({k.split(".")[2] for k in src if k.startswith("encoder.layer.")})
    if n_src != L:
        raise S3prlError(f"{path}: 'Transformer' has {n_src} layers, transformer.num_hidden_layers = {L}")
    for i in range(L):
        for s, a in _LAYER_MAP.items():
            for p in ("weight", "bias"):
                skey = f"encoder.layer.{i}.{s}.{p}"
                if cfg.encoder.share_layers:
                    if i == 0:
                        take(skey, f"{_ENC}layers.layers.0.{a}.{p}")
                    else:
                        if skey not in src:
                            raise S3prlError(f"{path}: 'Transformer' lacks '{skey}'")
                        used.add(skey)
                        if not torch.equal(src[skey].float(), out[f"{_ENC}layers.layers.0.{a}.{p}"]):
                            raise S3prlError(f"{path}: share_layer is True but '{skey}' differs from "
                                             f"'encoder.layer.0.{s}.{p}'")
                else:
                    take(skey, f"{_ENC}layers.layers.{i}.{a}.{p}")
    unused = sorted(set(src) - used)
    if unused:
        raise S3prlError(f"{path}: 'Transformer' tensors aviary cannot place: {unused[:6]}"
                         f"{' ...' if len(unused) > 6 else ''}")
    R = cfg.encoder.downsample
    w = out[f"{_ENC}input_proj.weight"]  # (H, D*R)
    want = (cfg.encoder.hidden_size, cfg.input.dim * R)
    if tuple(w.shape) != want:
        raise S3prlError(f"{path}: input_representations.spec_transform.weight has shape {tuple(w.shape)}, "
                         f"the audio/transformer config implies {want} (input dim {cfg.input.dim} x R={R})")
    if spec_head is not None:
        head = _strip(spec_head, path, "SpecHead")
        for s, a in _HEAD_MAP.items():
            for p in ("weight", "bias"):
                if f"{s}.{p}" not in head:
                    raise S3prlError(f"{path}: 'SpecHead' lacks '{s}.{p}'")
                out[f"head.{a}.{p}"] = head[f"{s}.{p}"].float()
        extra = sorted(set(head) - {f"{s}.{p}" for s in _HEAD_MAP for p in ("weight", "bias")})
        if extra:
            raise S3prlError(f"{path}: 'SpecHead' tensors aviary cannot place: {extra}")
        n_out = out["head.out.weight"].shape[0]
        if n_out not in (cfg.target.dim * R, cfg.target.dim):
            raise S3prlError(f"{path}: SpecHead.output has {n_out} outputs; target dim {cfg.target.dim} "
                             f"x R={R} = {cfg.target.dim * R} expected")
        if n_out != cfg.target.dim * R:
            # Current s3prl predicts one target frame per encoder frame even with R > 1.
            log.warning("%s: SpecHead predicts %d values per frame, aviary's head %d; head not imported",
                        path, n_out, cfg.target.dim * R)
            out = {k: v for k, v in out.items() if not k.startswith("head.")}
    return out


def read_s3prl_checkpoint(path: str | os.PathLike):
    """Read an s3prl upstream checkpoint into an aviary config and state dict.

    If the file was written by :func:`export_s3prl_checkpoint` and its s3prl sections are
    unchanged, the aviary config stored in it is used (restoring settings s3prl cannot express).

    Returns:
        ``(cfg, tensors, info)``: the ``MAMConfig``, the pretraining-model state dict (the
        head is missing when the file has no usable ``SpecHead``) and a dict with ``step``,
        ``data`` and ``source`` for the run's metadata.
    """
    path = Path(path)
    ck = read_torch_checkpoint(path)
    up = _upstream_config(ck, path)
    cfg = config_from_s3prl(up, path)
    stored = ck.get("aviary")
    if isinstance(stored, Mapping) and isinstance(stored.get("config"), Mapping):
        try:
            own = MAMConfig.from_dict(stored["config"])
            if _plain(config_to_s3prl(own)) == _plain(up):
                cfg = own
            else:
                log.warning("%s: Upstream_Config was changed after aviary exported it; using it, "
                            "not the stored aviary config", path)
        except (ConfigError, S3prlError) as e:
            log.warning("%s: ignoring the stored aviary config (%s)", path, e)
    if "Transformer" not in ck:
        raise S3prlError(f"{path}: no 'Transformer' state dict (keys {sorted(map(str, ck))})")
    spec_head = ck.get("SpecHead")
    if spec_head is None:
        log.warning("%s: no 'SpecHead'; the pretraining head keeps its random initialisation", path)
    tensors = state_dict_from_s3prl(ck["Transformer"], spec_head, cfg, path)
    step = ck.get("Step", ck.get("Global_step"))
    runner = ck.get("Config") if isinstance(ck.get("Config"), Mapping) and "transformer" not in ck["Config"] else {}
    datarc = ((runner or {}).get("pretrain_expert") or {}).get("datarc") or {}
    data = datarc.get("libri_root") or datarc.get("file_path")
    if datarc.get("sets"):
        data = f"{data or ''} {list(datarc['sets'])}".strip()
    info = {"step": int(step) if isinstance(step, (int, float)) else None, "data": data,
            "source": {"toolkit": "s3prl", "path": str(path.resolve()), "sha256": file_sha256(path)}}
    return cfg, tensors, info


def _plain(x: Any) -> Any:
    """Comparable form of a config section (tuples as lists, ints as floats)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    return x


def load_s3prl_upstream(path: str | os.PathLike):
    """``aviary.load("s3prl:PATH")``: an s3prl checkpoint as an aviary upstream.

    Returns:
        A :class:`~aviary.models.mam.MAMUpstream` with the checkpoint's weights.
    """
    cfg, tensors, info = read_s3prl_checkpoint(path)
    upstream = MAMUpstream(cfg)
    upstream.load_state_dict(upstream_state(tensors))
    upstream.checkpoint_path = str(path)
    upstream.checkpoint_meta = {"model": cfg.to_dict(), "step": info["step"], "source": info["source"]}
    return upstream


def import_s3prl_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``aviary import s3prl CKPT --out RUN_DIR``: write an aviary run directory.

    Writes ``RUN_DIR/model.safetensors`` (the pretraining model, config in its metadata) and
    ``RUN_DIR/run.json``; ``aviary.load(RUN_DIR)`` then gives the same hidden states as
    ``aviary.load("s3prl:CKPT")``.

    Returns:
        The path of the weights file.

    Raises:
        S3prlError: unreadable / unsupported checkpoint; FileExistsError if ``RUN_DIR`` holds
            a model already.
    """
    refuse_existing_model(out_dir)  # before the (slow) reading
    cfg, tensors, info = read_s3prl_checkpoint(path)
    model = build_pretrain(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise S3prlError(f"{path}: mapped weights do not fit the aviary model "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    weights = write_imported_run(out_dir, model.state_dict(), cfg, step=info["step"], source=info["source"],
                                 data=info["data"])
    log.info("imported %s (%s, %d layers, step %s) into %s", path, cfg.variant, cfg.encoder.num_layers,
             info["step"], out_dir)
    return weights


def _feat_to_s3prl(fe: FrontEndConfig, channel: int, where: str) -> dict[str, Any]:
    if fe.kind not in ("logmel", "linear"):
        raise S3prlError(f"{where}.kind = {fe.kind!r}: s3prl's online preprocessor has no Kaldi fbank")
    if fe.cmvn == "global":
        raise S3prlError(f"{where}.cmvn = 'global': s3prl only knows per-utterance CMVN")
    return {"feat_type": "mel" if fe.kind == "logmel" else "linear", "channel": channel, "log": True,
            "delta": fe.delta_order, "cmvn": fe.cmvn == "utterance"}


def config_to_s3prl(cfg) -> dict[str, Any]:
    """The s3prl ``Upstream_Config`` (transformer / task / audio) of an aviary ``MAMConfig``.

    Raises:
        S3prlError: a setting s3prl cannot express (pre-LN, tanh GELU, global CMVN, fbank,
            input and target front-ends with different STFT settings, no level normalisation).
    """
    enc, inp, tgt = cfg.encoder, cfg.input, cfg.target
    if enc.pre_ln:
        raise S3prlError("encoder.pre_ln = True: s3prl's pre-LN model adds per-layer output LayerNorms; "
                         "only post-LN models can be exported")
    if getattr(enc, "position_bias", "none") != "none":
        raise S3prlError(f"encoder.position_bias = {enc.position_bias!r}: s3prl's transformer has sinusoidal "
                         "positions only, so its attention would differ from this model's")
    if enc.activation not in ("gelu", "relu"):
        raise S3prlError(f"encoder.activation = {enc.activation!r}: s3prl has 'gelu' (erf) and 'relu'")
    for key in ("sample_rate", "win_length", "hop_length", "n_fft", "n_mels", "log_eps", "normalize_db"):
        if getattr(inp, key) != getattr(tgt, key) and not (key == "n_mels" and "linear" in (inp.kind, tgt.kind)):
            raise S3prlError(f"input.{key} = {getattr(inp, key)!r} but target.{key} = {getattr(tgt, key)!r}: "
                             "s3prl has one audio section for both")
    if inp.normalize_db is None:
        raise S3prlError("input.normalize_db is None: s3prl always scales waveforms to audio.target_level dB")
    hop_frames = round(cfg.chunk_seconds * inp.sample_rate / inp.hop_length)
    return {
        "transformer": {
            "input_dim": -1, "hidden_size": enc.hidden_size, "num_hidden_layers": enc.num_layers,
            "num_attention_heads": enc.num_heads, "intermediate_size": enc.ffn_size,
            "hidden_act": enc.activation, "hidden_dropout_prob": enc.dropout,
            "attention_probs_dropout_prob": enc.attn_dropout, "initializer_range": enc.init_std,
            "layer_norm_eps": enc.ln_eps, "share_layer": enc.share_layers, "pre_layer_norm": False,
            "downsample_rate": enc.downsample,
        },
        "task": {
            "loss": "L1", "sequence_length": hop_frames, "position_encoding_size": enc.hidden_size,
            "mask_proportion": cfg.masking.mask_proportion, "mask_consecutive_min": cfg.masking.span,
            "mask_consecutive_max": cfg.masking.span, "mask_allow_overlap": True, "mask_bucket_ratio": 1.5,
            "mask_frequency": cfg.masking.freq_mask_ratio, "noise_proportion": cfg.masking.noise_prob,
        },
        "audio": {
            "target_level": inp.normalize_db, "sample_rate": inp.sample_rate,
            "win_ms": inp.win_length * 1000 / inp.sample_rate, "hop_ms": inp.hop_length * 1000 / inp.sample_rate,
            "n_freq": inp.n_fft // 2 + 1, "n_mels": inp.n_mels if inp.kind == "logmel" else tgt.n_mels,
            "n_mfcc": 13, "eps": inp.log_eps,
            "input": _feat_to_s3prl(inp, 0, "input"),
            "target": _feat_to_s3prl(tgt, 1, "target"),
        },
    }


def state_dict_to_s3prl(tensors: Mapping[str, torch.Tensor], cfg) -> tuple[dict, dict | None]:
    """Inverse of :func:`state_dict_from_s3prl`: aviary pretraining-model tensors -> s3prl
    ``Transformer`` and ``SpecHead`` state dicts (shared layers are written under every index,
    all pointing at the same tensors, as s3prl's own ALBERT state dict does)."""
    def get(k: str) -> torch.Tensor:
        if k not in tensors:
            raise S3prlError(f"aviary weights lack '{k}'")
        return tensors[k].detach().cpu().float().contiguous().clone()

    tr: dict[str, torch.Tensor] = {}
    for s, a in _INPUT_MAP.items():
        for p in ("weight", "bias"):
            tr[f"{s}.{p}"] = get(f"{_ENC}{a}.{p}")
    shared_cache: dict[str, torch.Tensor] = {}
    for i in range(cfg.encoder.num_layers):
        j = 0 if cfg.encoder.share_layers else i
        for s, a in _LAYER_MAP.items():
            for p in ("weight", "bias"):
                akey = f"{_ENC}layers.layers.{j}.{a}.{p}"
                if akey not in shared_cache:
                    shared_cache[akey] = get(akey)
                tr[f"encoder.layer.{i}.{s}.{p}"] = shared_cache[akey]
    head = None
    if all(f"head.{a}.weight" in tensors for a in _HEAD_MAP.values()):
        head = {f"{s}.{p}": get(f"head.{a}.{p}") for s, a in _HEAD_MAP.items() for p in ("weight", "bias")}
    return tr, head


def export_s3prl_checkpoint(run: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """``aviary export s3prl RUN_DIR --out CKPT``: write an s3prl upstream checkpoint.

    Args:
        run: an aviary run directory or bundle file of the ``mam`` family.
        out_path: the ``.ckpt`` file to write (atomically; plain tensors and dicts only).

    Returns:
        ``out_path``.
    """
    wpath = find_weights(run)
    tensors, meta = load_tensors(wpath)
    stored = load_config_from_metadata(wpath, meta)
    model_cfg = stored.get("model", stored)
    if model_cfg.get("family") != "mam":
        raise S3prlError(f"{wpath}: model family {model_cfg.get('family')!r}; only Mockingjay / TERA / "
                         "Audio ALBERT ('mam') models have an s3prl layout")
    cfg = MAMConfig.from_dict(model_cfg)
    if cfg.encoder.downsample > 1:
        log.warning("R = %d: s3prl's current mockingjay/tera/audio_albert upstreams do not stack frames "
                    "(they ignore transformer.downsample_rate); this file loads in s3prl versions "
                    "that do. `aviary export s3prl-upstream` runs it in any s3prl", cfg.encoder.downsample)
    if cfg.encoder.downsample > 1 and cfg.encoder.stack_tail == "pad":
        log.info("s3prl drops the last T %% R frames when stacking; aviary keeps them, so outputs "
                 "differ slightly when T %% %d != 0", cfg.encoder.downsample)
    up = config_to_s3prl(cfg)
    tr, head = state_dict_to_s3prl(tensors, cfg)
    step = stored.get("step")
    train = stored.get("train") or {}
    ck: dict[str, Any] = {
        "Upstream_Config": up,
        # s3prl's builder reads "Config" first (legacy layout): it must exist and, for this
        # layout, hold the runner config rather than a 'transformer' section.
        "Config": {"runner": {"total_steps": train.get("steps")},
                   "optimizer": {"lr": train.get("lr"), "warmup_proportion": train.get("warmup_fraction")}},
        "Transformer": tr,
        "Step": int(step) if step is not None else 0,
        "aviary": {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                   "step": step, "source": str(wpath)},
    }
    if head is not None:
        ck["SpecHead"] = head
    buf = io.BytesIO()
    torch.save(ck, buf)
    out_path = Path(out_path)
    write_bytes_atomic(out_path, buf.getvalue())
    log.info("exported %s (%s, %d layers, step %s) to %s", wpath, cfg.variant, cfg.encoder.num_layers, step, out_path)
    return out_path


__all__ = ["S3prlError", "read_torch_checkpoint", "config_from_s3prl", "state_dict_from_s3prl",
           "read_s3prl_checkpoint", "load_s3prl_upstream", "import_s3prl_checkpoint", "config_to_s3prl",
           "state_dict_to_s3prl", "export_s3prl_checkpoint"]
