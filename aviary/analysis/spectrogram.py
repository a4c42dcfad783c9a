"""What masked acoustic modelling sees and predicts: input, masked input, reconstruction, target.

The Mockingjay paper (Liu et al. 2020, figure 1) illustrates pretraining with the input
spectrogram, its masked version and the model's reconstruction. This module runs a
pretraining model's forward pass on one utterance (masks drawn from a seeded generator) and
draws the four panels, with the masked frames marked on the time axis.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

log = logging.getLogger(__name__)


@dataclass
class ReconstructionExample:
    """Spectrograms of one utterance, (T, D) each, and the (T,) scored-frame mask."""

    input: np.ndarray
    masked_input: np.ndarray
    reconstruction: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    frame_shift: float
    name: str = ""


@torch.no_grad()
def reconstruction_example(model: torch.nn.Module, wav: torch.Tensor, seed: int = 0,
                           name: str = "") -> ReconstructionExample:
    """Mask one utterance, run the pretraining model, and collect the four spectrograms.

    Args:
        model: a MAM pretraining model whose ``forward(batch, generator)`` puts ``feats``
            (B, T, D_in), ``inputs`` (B, T', D_in*R) (masked, stacked), ``pred`` and ``target``
            (B, T, D_t) and ``mask`` (B, T) in ``extras``.
        wav: (N,) waveform at the model's sample rate.
        seed: masking seed (the figure is reproducible).
        name: label for the figure.

    Returns:
        The example; ``input`` and ``masked_input`` show the static part of the input
        features (deltas dropped), at the front-end's frame rate.
    """
    if wav.dim() != 1:
        raise ValueError(f"expected one waveform (N,), got shape {tuple(wav.shape)}")
    was_training = model.training
    model.eval()
    try:
        out = model({"wavs": wav[None], "wav_lengths": torch.tensor([wav.shape[0]])},
                    generator=torch.Generator().manual_seed(seed))
    finally:
        model.train(was_training)
    ex = out.extras
    missing = [k for k in ("feats", "inputs", "pred", "target", "mask") if k not in ex]
    if missing:
        raise KeyError(f"{type(model).__name__}.forward lacks extras {missing} (a masked acoustic model's "
                       f"objective returns them); has {sorted(ex)}")
    feats = ex["feats"][0].float()  # (T, D_in)
    T, D_in = feats.shape
    R = ex["inputs"].shape[-1] // D_in
    masked = rearrange(ex["inputs"][0].float(), "t (r d) -> (t r) d", r=R)[:T]  # (T, D_in)
    upstream = getattr(model, "upstream", None)
    cfg = getattr(model, "config", None)
    # Static bins come first when deltas are appended: show those only.
    n_static = _static_dim(cfg, D_in)
    frame_shift = float(getattr(getattr(upstream, "frontend", None), "frame_shift", 0.01))
    return ReconstructionExample(
        input=feats[:, :n_static].numpy(), masked_input=masked[:, :n_static].numpy(),
        reconstruction=ex["pred"][0].float().numpy(), target=ex["target"][0].float().numpy(),
        mask=ex["mask"][0].bool().numpy(), frame_shift=frame_shift, name=name)


def _static_dim(cfg, D_in: int) -> int:
    """Input bins without deltas: D_in / (delta_order + 1)."""
    order = getattr(getattr(cfg, "input", None), "delta_order", 0) or 0
    return D_in // (int(order) + 1)


def mask_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous ``True`` runs of a (T,) mask as ``[(start, end), ...]`` (end exclusive)."""
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    edges = np.flatnonzero(m[1:] != m[:-1])  # alternating starts and ends
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def plot_reconstruction(examples: list[ReconstructionExample], path: str) -> str:
    """One row per model: input, masked input, reconstruction, target (masked frames shaded).

    Args:
        examples: one example per model (same utterance for a fair comparison).
        path: PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        raise ValueError("no reconstruction examples to plot")
    fig, axes = plt.subplots(len(examples), 4, figsize=(16, 2.6 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        T = ex.input.shape[0]
        extent_t = T * ex.frame_shift
        lo, hi = np.percentile(ex.input, [2, 99.5])
        tlo, thi = np.percentile(ex.target, [2, 99.5])
        panels = [("input", ex.input, (lo, hi)), ("masked input", ex.masked_input, (lo, hi)),
                  ("reconstruction", ex.reconstruction, (tlo, thi)), ("target", ex.target, (tlo, thi))]
        for ax, (title, spec, (vmin, vmax)) in zip(row, panels):
            ax.imshow(spec.T, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                      extent=(0, extent_t, 0, spec.shape[1]), interpolation="nearest")
            ax.set_title(f"{ex.name}: {title}" if ex.name else title, fontsize=9)
            ax.set_xlabel("time (s)", fontsize=8)
            ax.set_ylabel("bin", fontsize=8)
            ax.tick_params(labelsize=7)
        # Mark the scored (masked) frames along the bottom of the last three panels, one
        # bar per contiguous run (one patch per frame would make the figure slow to draw).
        runs = mask_runs(ex.mask)
        bars = [(a * ex.frame_shift, (b - a) * ex.frame_shift) for a, b in runs]
        for ax in row[1:]:
            ax.broken_barh(bars, (0, 0.04 * ax.get_ylim()[1]), color="cyan", lw=0)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
