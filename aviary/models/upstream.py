"""The upstream interface shared by every pretrained model, and :func:`load`.

An *upstream* turns raw 16 kHz waveforms into every layer's representation. It owns its
front-end, so callers never compute features themselves::

    model = aviary.load("runs/aalbert-3l")
    hidden_states, lengths = model.extract(wavs, wav_lengths)
    # hidden_states: list of L+1 tensors (B, T, H); hidden_states[0] is the embedding output
    # lengths: (B,) valid output frames; frame k covers time k * model.frame_shift seconds
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from aviary.lengths import valid_mask

log = logging.getLogger(__name__)


class Upstream(nn.Module):
    """Base class of everything :func:`load` returns.

    Subclasses set ``frame_shift`` (seconds per output frame), ``hidden_size`` and
    ``num_hidden_states`` (L + 1: the embedding output counts) and implement :meth:`extract`.
    """

    frame_shift: float
    hidden_size: int
    num_hidden_states: int
    sample_rate: int = 16000

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden states for a padded batch of waveforms.

        Args:
            wavs: (B, N) float waveforms at ``sample_rate`` (or (N,) for one utterance).
            wav_lengths: (B,) valid samples per row; ``None`` means all rows are full length.
            max_layer: stop after this layer (0 = embedding output only); ``None`` = all.

        Returns:
            (hidden_states, lengths): a list of ``min(max_layer, L) + 1`` tensors (B, T, H) and
            (B,) valid frames per row. Padded positions hold unspecified values.
        """
        raise NotImplementedError

    def attentions(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's attention probabilities: (L tensors (B, heads, T, T), (B,) lengths).

        Only upstreams with self-attention over frames implement it (the MAM family).
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose attention maps "
                                  "(the masked acoustic models do: Mockingjay, AALBERT, TERA)")

    @staticmethod
    def as_batch(wavs: torch.Tensor, wav_lengths: torch.Tensor | None,
                  check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise (N,) / (B, N) input and default lengths; checks shapes.

        With ``check_finite`` (extraction), a row holding NaN / inf samples within its length
        is an error naming the row: its hidden states would be all NaN, without a word.
        Pretraining passes ``False``: the loop skips and counts non-finite steps itself.
        """
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        if wavs.dim() != 2:
            raise ValueError(f"wavs must be (B, N) or (N,), got shape {tuple(wavs.shape)}")
        if wav_lengths is None:
            wav_lengths = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        wav_lengths = torch.as_tensor(wav_lengths, dtype=torch.long, device=wavs.device)
        if wav_lengths.shape != (wavs.shape[0],):
            raise ValueError(f"wav_lengths must be ({wavs.shape[0]},), got {tuple(wav_lengths.shape)}")
        if int(wav_lengths.max()) > wavs.shape[1]:
            raise ValueError(f"wav_lengths max {int(wav_lengths.max())} > padded length {wavs.shape[1]}")
        wavs = wavs.float()
        if check_finite:
            inside = valid_mask(wav_lengths, wavs.shape[1])  # (B, N)
            bad = (~torch.isfinite(wavs) & inside).sum(1)  # (B,)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise ValueError(f"wavs row(s) {rows[:5]} hold non-finite (NaN / inf) samples "
                                 f"({int(bad[rows[0]])} in row {rows[0]}); their hidden states would be NaN. "
                                 "Check the audio (`aviary check-data`)")
        return wavs, wav_lengths


def _find_weights(path: Path) -> Path:
    """A run directory's newest weights file, or the file itself."""
    if path.is_file():
        return path
    if path.is_dir():
        for cand in (path / "model.safetensors",):
            if cand.is_file():
                return cand
        from aviary.train.checkpoint import CheckpointError

        ckdir = path / "checkpoints"
        steps = sorted(ckdir.glob("step-*/model.safetensors"), reverse=True) if ckdir.is_dir() else []
        if steps:
            return steps[0]
        raise CheckpointError(f"{path}: no model.safetensors and no checkpoints/step-*/model.safetensors")
    raise FileNotFoundError(f"{path}: no such run directory or checkpoint file")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> Upstream:
    """Load a pretrained upstream.

    Args:
        path: a run directory (its ``model.safetensors`` or newest checkpoint), a
            single-file bundle (``.safetensors`` with the config in its metadata), or
            ``"s3prl:CKPT"`` to import an s3prl Mockingjay / TERA / AALBERT checkpoint.
        device: where to put the model.

    Returns:
        The :class:`Upstream` in eval mode.
    """
    spath = str(path)
    if spath.startswith("s3prl:"):
        from aviary.interop.s3prl import load_s3prl_upstream

        return load_s3prl_upstream(spath[len("s3prl:"):], **kwargs).to(device).eval()
    from aviary.models.registry import config_from_dict, get_family
    from aviary.train.checkpoint import load_config_from_metadata, load_tensors, torch_file_kind

    wpath = _find_weights(Path(spath))
    if torch_file_kind(wpath) is not None:
        from aviary.train.checkpoint import CheckpointError

        # A torch.save zip or a raw pickle: another toolkit's file, never unpickled here.
        raise CheckpointError(f"{wpath}: a torch/pickle file, not an aviary safetensors checkpoint; "
                              f"for s3prl checkpoints use aviary.load('s3prl:{wpath}') or `aviary import s3prl`")
    tensors, meta = load_tensors(wpath)
    cfg_dict = load_config_from_metadata(wpath, meta)
    model_cfg = cfg_dict.get("model", cfg_dict)
    cfg = config_from_dict(model_cfg, source=wpath)
    family = get_family(cfg.family)
    upstream = family.build_upstream(cfg)
    # Pretraining checkpoints store the whole pretraining model; the upstream is its
    # "upstream." sub-module. Bundles exported for extraction store the upstream alone.
    prefix = "upstream."
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = sub if sub else tensors
    missing, unexpected = upstream.load_state_dict(state, strict=False)
    if missing:
        from aviary.train.checkpoint import CheckpointError

        raise CheckpointError(f"{wpath}: weights missing for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if unexpected and not sub:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", wpath, len(unexpected), unexpected[:3])
    upstream.checkpoint_path = str(wpath)
    upstream.checkpoint_meta = cfg_dict
    return upstream.to(device).eval()
