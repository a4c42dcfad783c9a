"""SSAST's patch masks: pure, seeded, batched functions (Gong et al. 2022, section 2).

:func:`cluster_mask` (the paper's default: patches grown in square clusters around random
centres) and :func:`random_mask` never select padding and always select exactly the requested
number of patches of each clip (:func:`num_masked_for`); :func:`gather_masked` turns a batch
of masks with different counts into padded indices and a validity mask, so the objective
(:mod:`aviary.objectives.mspm`) is one batched matmul with no per-clip loop.
"""
from __future__ import annotations

import torch

from aviary.lengths import valid_mask

def num_masked_for(num_valid: torch.Tensor, num_masked: int, num_masked_of: int) -> torch.Tensor:
    """How many patches to mask in clips with ``num_valid`` valid patches.

    ``round(num_valid * num_masked / num_masked_of)``, at least 1 and at most ``num_valid``
    (a clip with one patch gets it masked: InfoNCE is then trivially zero but the MSE term
    still trains).

    Args:
        num_valid: (B,) long, valid patches per clip.
        num_masked, num_masked_of: the configured ratio (400 of 512 in the paper).

    Returns:
        (B,) long.
    """
    n = torch.round(num_valid.double() * num_masked / num_masked_of).long()
    return torch.minimum(n.clamp(min=1), num_valid)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last axis (0 = smallest). (..., N) -> (..., N) long."""
    return scores.argsort(dim=-1).argsort(dim=-1)


def random_mask(valid: torch.Tensor, num_masked: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask exactly ``num_masked[b]`` uniformly chosen valid positions of each row.

    Args:
        valid: (B, N) bool, True where a patch exists (False = padding, never masked).
        num_masked: (B,) long, at most the row's valid count.
        generator: seeds the draw (same generator state -> same mask).

    Returns:
        (B, N) bool mask, True = masked.
    """
    if bool((num_masked > valid.sum(-1)).any()):
        raise ValueError(f"num_masked {num_masked.tolist()} exceeds valid counts {valid.sum(-1).tolist()}")
    scores = torch.rand(valid.shape, generator=generator, device=valid.device)  # (B, N) in [0, 1)
    scores = scores.masked_fill(~valid, 2.0)  # padding ranks last
    return (_ranks(scores) < num_masked[:, None]) & valid


def cluster_mask(valid: torch.Tensor, num_masked: torch.Tensor,
                 cluster_sizes: tuple[int, ...] = (3, 4, 5),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SSAST cluster masking on a (time, frequency) patch grid, batched over clips.

    Per clip a block size C is drawn from ``cluster_sizes``. Then, in rounds, every clip that
    still needs patches picks a random not-yet-masked valid patch and masks the C x C block
    around it (rows ``t - (C-1)//2 .. t + C//2``, same for frequency), clipped to the grid
    and to the clip's valid patches. When a block would overshoot the target, only as many
    of its new patches as needed are kept (chosen at random), so the count is exact.

    Differences from the reference code, on purpose: blocks are centred on the drawn patch
    and do not wrap around the edge of the frequency axis; the drawn patch is never already
    masked (so every round makes progress); trimming affects only the last block instead of
    truncating a sorted set of indices.

    Args:
        valid: (B, T, F) bool grid, True where a patch exists (time-major, as the encoder
            orders its tokens).
        num_masked: (B,) long, exact number of patches to mask per clip.
        cluster_sizes: candidate block sizes C.
        generator: seeds every draw.

    Returns:
        (B, T, F) bool mask, True = masked; ``mask.sum((1, 2)) == num_masked``.
    """
    if valid.dim() != 3:
        raise ValueError(f"cluster_mask expects a (B, T, F) grid, got shape {tuple(valid.shape)}")
    B, T, Fq = valid.shape
    dev = valid.device
    if bool((num_masked > valid.sum((1, 2))).any()):
        raise ValueError(f"num_masked {num_masked.tolist()} exceeds valid counts "
                         f"{valid.sum((1, 2)).tolist()}")
    sizes = torch.tensor(cluster_sizes, device=dev)
    C = sizes[torch.randint(len(cluster_sizes), (B,), generator=generator, device=dev)]  # (B,)
    lo = ((C - 1) // 2)[:, None, None]  # cells before the centre, (B, 1, 1)
    hi = (C // 2)[:, None, None]        # cells after the centre
    t_idx = torch.arange(T, device=dev)[None, :, None]  # (1, T, 1)
    f_idx = torch.arange(Fq, device=dev)[None, None, :]  # (1, 1, F)
    mask = torch.zeros_like(valid)
    while True:
        remaining = num_masked - mask.sum((1, 2))  # (B,)
        active = remaining > 0
        if not bool(active.any()):
            return mask
        free = valid & ~mask  # (B, T, F) candidates for centres and new patches
        scores = torch.rand((B, T * Fq), generator=generator, device=dev)
        centre = scores.masked_fill(~free.flatten(1), -1.0).argmax(-1)  # (B,)
        ct = (centre // Fq)[:, None, None]
        cf = (centre % Fq)[:, None, None]
        dt, df = t_idx - ct, f_idx - cf
        block = (dt >= -lo) & (dt <= hi) & (df >= -lo) & (df <= hi)  # (B, T, F)
        new = block & free & active[:, None, None]
        over = new.sum((1, 2)) > remaining
        if bool(over.any()):
            # Keep a random subset of exactly `remaining` new patches of the last block.
            r = torch.rand((B, T * Fq), generator=generator, device=dev)
            r = r.masked_fill(~new.flatten(1), 2.0)
            keep = (_ranks(r) < remaining[:, None]).view(B, T, Fq)
            new = new & keep
        mask = mask | new


def gather_masked(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the masked positions of each row, padded to the largest count.

    Args:
        mask: (B, N) bool.

    Returns:
        (index (B, M) long, valid (B, M) bool) with M = max masked count; row b lists its
        masked positions in increasing order, then arbitrary filler marked invalid.
    """
    counts = mask.sum(-1)  # (B,)
    M = int(counts.max()) if mask.numel() else 0
    # A stable sort of "not masked" puts masked positions first, in their original order.
    index = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :M]
    valid = valid_mask(counts, M)
    return index, valid
